//! Policy generations and their atomic swap.
//!
//! The running policy is an `Arc<Generation>` behind a mutex. A decision takes one clone of
//! the Arc ([`PolicyStore::current`]) and uses only it, so every decision sees exactly one
//! generation, whatever an apply does meanwhile. An apply loads and validates the whole new
//! tree first and swaps only if it is valid and its hash is the one the client validated;
//! otherwise the old generation keeps running and the rejection (with the reason) is kept
//! for `policyctl status`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_policy::control::{RejectedApply, RunningTree, StatusInfo, TreeFile};
use bulkhead_policy::{Policy, PolicyTree, RootDir, ValidateOptions};

/// One validated policy with its number.
#[derive(Debug)]
pub struct Generation {
    /// 0 for the boot-time deny-all policy, then 1, 2, … per successful load.
    pub number: u64,
    /// The policy.
    pub policy: Policy,
    /// The files it was compiled from (for `policyctl` to diff against what runs).
    pub files: Vec<TreeFile>,
}

/// The running generation and how to load new ones.
#[derive(Debug)]
pub struct PolicyStore {
    current: Mutex<Arc<Generation>>,
    last_rejected: Mutex<Option<RejectedApply>>,
    roots: Vec<RootDir>,
    opts: ValidateOptions,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A loaded and validated tree: the policy, its hash, its files.
type Loaded = (Policy, String, Vec<TreeFile>);

/// Loads and validates a tree; the error is every diagnostic, one per line.
pub fn load_tree(roots: &[RootDir], opts: &ValidateOptions) -> Result<Loaded, String> {
    let tree = PolicyTree::load(roots);
    match tree.compile(opts) {
        Ok(c) => {
            let files = tree
                .files
                .into_iter()
                .map(|f| TreeFile {
                    name: f.name,
                    bytes: f.bytes,
                })
                .collect();
            Ok((c.policy, tree.hash, files))
        }
        Err(diags) => Err(diags
            .0
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

impl PolicyStore {
    /// Loads the boot policy from `roots`. A bad tree gives the deny-all generation 0 and
    /// the reason (the caller reports it loudly); the hub still starts, fail-closed.
    pub fn boot(roots: Vec<RootDir>, opts: ValidateOptions) -> (PolicyStore, Option<String>) {
        let (gen, err) = match load_tree(&roots, &opts) {
            Ok((policy, _, files)) => (
                Generation {
                    number: 1,
                    policy,
                    files,
                },
                None,
            ),
            Err(e) => (
                Generation {
                    number: 0,
                    policy: Policy::deny_all(),
                    files: Vec::new(),
                },
                Some(e),
            ),
        };
        (
            PolicyStore {
                current: Mutex::new(Arc::new(gen)),
                last_rejected: Mutex::new(None),
                roots,
                opts,
            },
            err,
        )
    }

    /// The running generation (one Arc clone: use it for the whole decision).
    pub fn current(&self) -> Arc<Generation> {
        Arc::clone(&lock(&self.current))
    }

    /// The configured roots.
    pub fn roots(&self) -> &[RootDir] {
        &self.roots
    }

    /// Loads `root`, checks its hash against `tree_hash` and the running hash against
    /// `if_match`, and swaps. `root` equal to the hub's first configured root means "the
    /// hub's own tree" (all configured roots, e.g. with the transient directory); any other
    /// directory is loaded alone.
    pub fn apply(
        &self,
        root: &Path,
        tree_hash: &str,
        if_match: Option<&str>,
    ) -> Result<Arc<Generation>, String> {
        let roots = if self.roots.first().map(|r| r.path.as_path()) == Some(root) {
            self.roots.clone()
        } else {
            RootDir::staging(root)
        };
        let result = load_tree(&roots, &self.opts).and_then(|(policy, hash, files)| {
            if hash != tree_hash {
                return Err(format!(
                    "the tree at {} hashes to {hash}, not {tree_hash} (changed since it was validated)",
                    root.display()
                ));
            }
            Ok((policy, files))
        });
        let (policy, files) = match result {
            Ok(p) => p,
            Err(reason) => return Err(self.reject(tree_hash, reason)),
        };
        let mut cur = lock(&self.current);
        if let Some(expected) = if_match {
            if cur.policy.tree_hash() != expected {
                let reason = format!(
                    "stale --if-match: running tree is {}, not {expected}",
                    cur.policy.tree_hash()
                );
                drop(cur);
                return Err(self.reject(tree_hash, reason));
            }
        }
        let next = Arc::new(Generation {
            number: cur.number.saturating_add(1),
            policy,
            files,
        });
        *cur = Arc::clone(&next);
        Ok(next)
    }

    fn reject(&self, tree_hash: &str, reason: String) -> String {
        *lock(&self.last_rejected) = Some(RejectedApply {
            tree_hash: tree_hash.to_string(),
            reason: reason.clone(),
            at_unix: now(),
        });
        reason
    }

    /// What `policyctl status` shows.
    pub fn status(&self) -> StatusInfo {
        let cur = self.current();
        StatusInfo {
            generation: cur.number,
            tree_hash: cur.policy.tree_hash().to_string(),
            files: cur.policy.files().to_vec(),
            last_rejected: lock(&self.last_rejected).clone(),
        }
    }

    /// The running generation's files (`policyctl`'s diff base).
    pub fn running_tree(&self) -> RunningTree {
        let cur = self.current();
        RunningTree {
            generation: cur.number,
            tree_hash: cur.policy.tree_hash().to_string(),
            files: cur.files.clone(),
        }
    }

    /// The first configured root (where `policyctl` edits go).
    pub fn primary_root(&self) -> Option<PathBuf> {
        self.roots.first().map(|r| r.path.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn bad_tree_keeps_old_generation_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "10-a.policy",
            "version 1\ngrant a quota shm=1MiB\n",
        );
        let (store, err) = PolicyStore::boot(RootDir::staging(d.path()), Default::default());
        assert!(err.is_none(), "{err:?}");
        let g1 = store.current();
        assert_eq!(g1.number, 1);

        let bad = tempfile::tempdir().unwrap();
        write(bad.path(), "10-a.policy", "version 1\ngrant a frobnicate\n");
        let hash = PolicyTree::load(&RootDir::staging(bad.path())).hash;
        let e = store.apply(bad.path(), &hash, None).unwrap_err();
        assert!(e.contains("10-a.policy"), "{e}");
        assert_eq!(store.current().number, 1);
        assert!(store.status().last_rejected.is_some());

        let good = tempfile::tempdir().unwrap();
        write(
            good.path(),
            "10-a.policy",
            "version 1\ngrant a quota shm=2MiB\n",
        );
        let hash = PolicyTree::load(&RootDir::staging(good.path())).hash;
        assert!(store.apply(good.path(), "sha256:0", None).is_err());
        assert!(store
            .apply(good.path(), &hash, Some("sha256:stale"))
            .is_err());
        let g2 = store
            .apply(good.path(), &hash, Some(g1.policy.tree_hash()))
            .unwrap();
        assert_eq!(g2.number, 2);
        // A decision that took generation 1 still sees generation 1.
        assert_eq!(g1.policy.quota_for("a").shm.value, 1 << 20);
        assert_eq!(store.current().policy.quota_for("a").shm.value, 2 << 20);
    }

    #[test]
    fn boot_with_bad_tree_is_deny_all() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "10-a.policy", "garbage\n");
        let (store, err) = PolicyStore::boot(RootDir::staging(d.path()), Default::default());
        assert!(err.is_some());
        assert_eq!(store.current().number, 0);
    }
}
