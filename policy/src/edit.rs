//! Atomic, idempotent edits of a policy tree (`grant`, `deny`, `revoke`, `fmt`, `edit`).
//!
//! Every edit computes the new file contents, validates the whole tree as it would be, and
//! only then writes: temp file in the same directory (created with `O_EXCL|O_NOFOLLOW`,
//! with the old file's mode and owner), fsync, rename over the old file, fsync the
//! directory. A rejected edit writes nothing.
//!
//! Edits run at the same moment by several scripts or people all take effect: each
//! read-validate-write cycle holds [`TreeLock`], an exclusive flock(2) on the directory it
//! writes to, from before it reads the tree until after the rename. `edit`, which cannot hold
//! the lock while a person types, instead refuses to write over a file that changed since it
//! read it ([`replace_if_unchanged`]).

use crate::ast::{Action, Effect, Item, Rule, Subject};
use crate::diag::Diagnostics;
use crate::diff::{diff, Change};
use crate::eval::{Policy, RuleRef};
use crate::tree::{valid_file_name, PolicyTree, RootDir, SUFFIX};
use crate::validate::{overlap, ValidateOptions};
use crate::Diagnostic;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why an edit was not made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The tree is already invalid; fix it first.
    #[error("the current policy tree is invalid; fix it first:\n{0}")]
    TreeInvalid(Diagnostics),
    /// The edit would make the tree invalid; nothing was written.
    #[error("the edit would make the policy invalid; nothing was written:\n{0}")]
    WouldBeInvalid(Diagnostics),
    /// Bad target file name.
    #[error("bad policy file name `{0}` (use [0-9a-z][0-9a-z_.-]*.policy, e.g. 50-local.policy)")]
    BadFileName(String),
    /// No root to edit.
    #[error("no policy directory to edit")]
    NoRoot,
    /// The file changed since `edit` read it; nothing was written.
    #[error(
        "{} changed since `edit` read it (another edit was written meanwhile); nothing was \
         written; your version is in {}",
        path.display(),
        kept.display()
    )]
    Changed {
        /// The file.
        path: PathBuf,
        /// Where the refused version is kept.
        kept: PathBuf,
    },
    /// Writing failed.
    #[error("cannot write {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
}

/// An exclusive lock on one policy directory, held for a whole read-validate-write cycle:
/// flock(2) on the directory itself (no lock file to leave behind), released when dropped
/// or when the process dies.
#[derive(Debug)]
pub struct TreeLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl TreeLock {
    /// Waits until no other edit holds `dir`, then holds it.
    pub fn acquire(dir: &Path) -> Result<TreeLock, EditError> {
        use nix::fcntl::{Flock, FlockArg};
        use std::os::unix::fs::OpenOptionsExt;
        let io = |err| EditError::Io {
            path: dir.to_path_buf(),
            err,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io)?;
        let mut how = FlockArg::LockExclusiveNonblock;
        loop {
            match Flock::lock(file, how) {
                Ok(lock) => return Ok(TreeLock { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                    log::info!("{}: waiting for another policy edit", dir.display());
                    how = FlockArg::LockExclusive;
                    file = f;
                }
                Err((f, nix::errno::Errno::EINTR)) => file = f,
                Err((_, e)) => return Err(io(std::io::Error::from(e))),
            }
        }
    }
}

/// A fresh temporary file next to `path`: a dotfile (the loader ignores it even if we crash
/// before the rename), created with `O_CREAT|O_EXCL|O_NOFOLLOW` so it can neither reuse nor
/// follow anything already there, with `path`'s mode and owner (0644 for a new file).
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("policy");
    // Through a symlink, the mode and owner of what it points to (a symlink's own are 0777).
    let old = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mode = old.as_ref().map_or(0o644, |m| m.mode() & 0o7777);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    for attempt in 0..100u32 {
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{nanos:08x}.{attempt}",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => {
                let set = (|| {
                    if let Some(m) = &old {
                        // Keep the owner where we may (root may; others keep their own).
                        match std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
                            Err(e) => return Err(e),
                        }
                    }
                    f.set_permissions(std::fs::Permissions::from_mode(mode))
                })();
                if let Err(e) = set {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                return Ok((tmp, f));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

/// Write `bytes` to `path` atomically: a fresh temp file ([`create_temp`]), fsync, rename,
/// fsync the directory. Hold the directory's [`TreeLock`] around the read that produced
/// `bytes` and this write.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let io = |err| EditError::Io {
        path: path.to_path_buf(),
        err,
    };
    let dir = path
        .parent()
        .ok_or_else(|| io(std::io::Error::other("no parent directory")))?;
    let (tmp, mut f) = create_temp(path).map_err(io)?;
    let res = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        log::info!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    res.map_err(io)
}

/// `edit`'s write: under the directory's lock, writes `bytes` to `target` only if the
/// file still holds `expected` (None: it did not exist) and the whole tree with `bytes`
/// in it still validates. If the file changed meanwhile, nothing is written and the
/// error names `kept`, where the caller keeps the refused version.
pub fn replace_if_unchanged(
    roots: &[RootDir],
    target: &Path,
    expected: Option<&[u8]>,
    bytes: &[u8],
    kept: &Path,
    opts: &ValidateOptions,
) -> Result<Edited, EditError> {
    let root = roots.first().ok_or(EditError::NoRoot)?;
    let _lock = TreeLock::acquire(&root.path)?;
    let now = match std::fs::read(target) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => {
            return Err(EditError::Io {
                path: target.to_path_buf(),
                err,
            })
        }
    };
    if now.as_deref() != expected {
        return Err(EditError::Changed {
            path: target.to_path_buf(),
            kept: kept.to_path_buf(),
        });
    }
    let (_, old) = current(roots, opts)?;
    let mut overrides = HashMap::new();
    overrides.insert(target.to_path_buf(), bytes.to_vec());
    write_all(roots, &old, overrides, opts)
}

/// A successful edit.
#[derive(Debug)]
pub struct Edited {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The semantic diff.
    pub changes: Vec<Change>,
    /// Warnings of the new tree.
    pub warnings: Vec<Diagnostic>,
}

/// Result of [`add_rule`].
#[derive(Debug)]
pub enum AddOutcome {
    /// The same rule already exists; nothing written.
    AlreadyPresent(RuleRef),
    /// The rule was appended.
    Added(Edited),
}

fn current(roots: &[RootDir], opts: &ValidateOptions) -> Result<(PolicyTree, Policy), EditError> {
    let tree = PolicyTree::load(roots);
    let p = tree.compile(opts).map_err(EditError::TreeInvalid)?;
    Ok((tree, p.policy))
}

fn write_all(
    roots: &[RootDir],
    old: &Policy,
    overrides: HashMap<PathBuf, Vec<u8>>,
    opts: &ValidateOptions,
) -> Result<Edited, EditError> {
    let tree = PolicyTree::load_with_overrides(roots, &overrides);
    let new = tree.compile(opts).map_err(EditError::WouldBeInvalid)?;
    let mut files: Vec<PathBuf> = overrides.keys().cloned().collect();
    files.sort();
    for f in &files {
        if let Some(b) = overrides.get(f) {
            atomic_write(f, b)?;
        }
    }
    Ok(Edited {
        files,
        changes: diff(old, &new.policy),
        warnings: new.warnings,
    })
}

/// Append `rule` (canonical text) to `file_name` in the primary root, unless the same rule
/// already exists anywhere in the tree.
pub fn add_rule(
    roots: &[RootDir],
    file_name: &str,
    rule: &Rule,
    opts: &ValidateOptions,
) -> Result<AddOutcome, EditError> {
    if !valid_file_name(file_name) || !file_name.ends_with(SUFFIX) {
        return Err(EditError::BadFileName(file_name.to_string()));
    }
    let root = roots.first().ok_or(EditError::NoRoot)?;
    if !root.required {
        std::fs::create_dir_all(&root.path).map_err(|err| EditError::Io {
            path: root.path.clone(),
            err,
        })?;
    }
    // A missing directory (a --root that does not exist) is reported by the tree load.
    let _lock = if root.path.is_dir() {
        Some(TreeLock::acquire(&root.path)?)
    } else {
        None
    };
    let (_, old) = current(roots, opts)?;
    let text = rule.to_string();
    if let Some(e) = old.rules().iter().find(|e| e.rule.to_string() == text) {
        return Ok(AddOutcome::AlreadyPresent(e.at.clone()));
    }
    let target = root.path.join(file_name);
    let mut bytes = match std::fs::read(&target) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(EditError::Io { path: target, err }),
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    let mut overrides = HashMap::new();
    overrides.insert(target, bytes);
    write_all(roots, &old, overrides, opts).map(AddOutcome::Added)
}

/// What `revoke` matches: effect, subject, verb and object (a connect object without
/// `@provider` matches any provider).
#[derive(Clone, Debug)]
pub struct RuleKey {
    /// Grant or deny lines.
    pub effect: Effect,
    /// Subject.
    pub subject: Subject,
    /// The action (only verb and object are compared).
    pub action: Action,
}

fn same_object(a: &Action, b: &Action) -> bool {
    match (a, b) {
        (
            Action::Connect {
                service: s1,
                provider: p1,
                ..
            },
            Action::Connect {
                service: s2,
                provider: p2,
                ..
            },
        ) => s1 == s2 && (p1.is_none() || p2.is_none() || p1 == p2),
        _ => a.verb() == b.verb() && a.object() == b.object(),
    }
}

/// Result of [`remove_rule`].
#[derive(Debug)]
pub struct Revoked {
    /// Lines removed.
    pub removed: Vec<RuleRef>,
    /// The edit (None if nothing was removed).
    pub edited: Option<Edited>,
    /// Grants that still give the subject this access (from a group, `@any`, another
    /// root), with their location.
    pub still_granted: Vec<String>,
}

/// Remove the lines matching `key` from the primary root's files; then report any other
/// grant that still gives the subject the same access.
pub fn remove_rule(
    roots: &[RootDir],
    key: &RuleKey,
    opts: &ValidateOptions,
) -> Result<Revoked, EditError> {
    let root = roots.first().ok_or(EditError::NoRoot)?;
    // No directory: nothing to revoke in it (the tree load says what is wrong).
    let _lock = if root.path.is_dir() {
        Some(TreeLock::acquire(&root.path)?)
    } else {
        None
    };
    let (tree, old) = current(roots, opts)?;
    let mut removed = Vec::new();
    let mut overrides = HashMap::new();
    for (f, parsed) in tree.files.iter().zip(&tree.parsed) {
        if f.root != Some(0) {
            continue;
        }
        let hits: Vec<u32> = parsed
            .lines
            .iter()
            .filter(|l| match &l.item {
                Item::Rule(r) => {
                    r.effect == key.effect
                        && r.subject == key.subject
                        && same_object(&r.action, &key.action)
                }
                _ => false,
            })
            .map(|l| l.line)
            .collect();
        if hits.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(&f.bytes);
        let mut out = String::with_capacity(text.len());
        let lines: Vec<&str> = text.split('\n').collect();
        let last = lines.len();
        for (i, l) in lines.into_iter().enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            if hits.contains(&n) {
                continue;
            }
            out.push_str(l);
            if i + 1 < last {
                out.push('\n');
            }
        }
        let root = roots.first().ok_or(EditError::NoRoot)?;
        overrides.insert(root.path.join(&f.rel), out.into_bytes());
        removed.extend(hits.into_iter().map(|line| RuleRef {
            file: std::sync::Arc::from(f.name.as_str()),
            line,
        }));
    }
    let (edited, new) = if overrides.is_empty() {
        (None, old)
    } else {
        let e = write_all(roots, &old, overrides, opts)?;
        let (_, new) = current(roots, opts)?;
        (Some(e), new)
    };
    let mut still = Vec::new();
    if key.effect == Effect::Grant {
        for e in new.rules() {
            if e.rule.effect == Effect::Grant
                && same_object(&e.rule.action, &key.action)
                && overlap(&e.rule.subject, &key.subject, new.groups())
            {
                let via = match &e.rule.subject {
                    s if *s == key.subject => "directly".to_string(),
                    s => format!("via {s}"),
                };
                still.push(format!(
                    "{} gets this {via} at {}: {}",
                    key.subject, e.at, e.rule
                ));
            }
        }
    }
    Ok(Revoked {
        removed,
        edited,
        still_granted: still,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn atomic_write_keeps_the_mode_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("50-local.policy");
        std::fs::write(&f, "version 1\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        atomic_write(&f, b"version 1\ngrant a quota vfds=1\n").unwrap();
        assert_eq!(mode(&f), 0o640);
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "version 1\ngrant a quota vfds=1\n"
        );
        let new = d.path().join("60-new.policy");
        atomic_write(&new, b"version 1\n").unwrap();
        assert_eq!(mode(&new), 0o644);
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A symlink planted where the temporary file would go (the old name was predictable:
    /// `.<file>.tmp.<pid>`) cannot redirect the write: the temporary file is always created
    /// new (O_EXCL), never through a symlink (O_NOFOLLOW).
    #[test]
    fn a_planted_symlink_cannot_redirect_the_write() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("50-local.policy");
        let victim = d.path().join("victim");
        let planted = d
            .path()
            .join(format!(".50-local.policy.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        atomic_write(&f, b"version 1\n").unwrap();
        assert!(
            !victim.exists(),
            "the write went through the planted symlink"
        );
        assert!(!std::fs::symlink_metadata(&f)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "version 1\n");
    }
}
