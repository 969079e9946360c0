//! `policyctl apply`: validate, show the diff from what the hub runs (or `--from DIR`),
//! then ask the hub to swap generations atomically (compare-and-swap with `--if-match`,
//! which names the running generation's hash).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::hub::{hub_request, hub_unexpected, is_running, running};
use super::{print_diags, print_json, Ctx, FAIL, OK, USAGE};
use crate::control::{Request, Response};
use crate::diff::{self, Change};
use crate::{Policy, PolicyTree, RootDir};

fn valid_hash(h: &str) -> bool {
    h.strip_prefix("sha256:").is_some_and(|x| {
        x.len() == 64
            && x.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

/// What `apply` is about to do: the new tree (validated), what it is compared with, and
/// the semantic diff between them.
pub struct Plan {
    /// The new tree's hash.
    pub tree_hash: String,
    /// Its files.
    pub files: usize,
    /// Its primary directory (what the hub is asked to load).
    pub root: Option<PathBuf>,
    /// What it is compared with: `running generation N (sha256:…)` or a directory.
    pub base: String,
    /// From the base to the new tree.
    pub changes: Vec<Change>,
}

/// Validates the new tree and computes the diff from the hub's running generation (or
/// `from`); with `if_match`, refuses unless the running generation hashes to it. Errors
/// and refusals are printed; the error is the exit code.
pub fn plan(cx: &Ctx, if_match: Option<&str>, from: Option<&Path>) -> Result<Plan, u8> {
    if let Some(h) = if_match {
        if !valid_hash(h) {
            eprintln!("error: --if-match takes sha256:<64 lowercase hex digits>, as printed by `policyctl status`");
            return Err(USAGE);
        }
    }
    let roots = cx.roots(None);
    let (tree, new) = cx.load_overrides(&roots, &HashMap::new(), true)?;
    print_diags(cx, &new.warnings);
    // What the new tree is compared with: --from DIR, or what the hub runs. --if-match is
    // always about what the hub runs.
    let from = from.filter(|d| !is_running(Some(d)));
    let running = if from.is_none() || if_match.is_some() {
        Some(running(cx)?)
    } else {
        None
    };
    // Compare-and-swap, first step: refuse a stale hash before sending the apply (the hub
    // checks it again at the swap, against the generation running then).
    if let (Some(h), Some(r)) = (if_match, &running) {
        if h != r.tree_hash {
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "refused", "reason": "stale --if-match", "running": r.tree_hash, "generation": r.generation, "if_match": h}),
                );
            } else {
                eprintln!("error: refused: stale --if-match: the hub runs generation {} ({}), not {h}; review `policyctl apply --dry-run` and retry with that hash", r.generation, r.tree_hash);
            }
            return Err(FAIL);
        }
    }
    let (base, old) = match (from, running) {
        (Some(d), _) => {
            let old = PolicyTree::load(&RootDir::staging(d))
                .compile(&cx.opts)
                .map(|c| c.policy)
                .unwrap_or_else(|_| Policy::deny_all());
            (d.display().to_string(), old)
        }
        (None, Some(r)) => (r.describe(), r.policy),
        (None, None) => return Err(FAIL),
    };
    Ok(Plan {
        changes: diff::diff(&old, &new.policy),
        tree_hash: tree.hash.clone(),
        files: tree.files.len(),
        root: tree.primary_root().map(Path::to_path_buf),
        base,
    })
}

/// Runs `apply`.
pub fn run(
    cx: &Ctx,
    dry_run: bool,
    if_match: Option<&str>,
    revoke_live: bool,
    from: Option<&Path>,
) -> u8 {
    let Plan {
        tree_hash,
        files,
        root,
        base,
        changes,
    } = match plan(cx, if_match, from) {
        Ok(p) => p,
        Err(c) => return c,
    };
    if !cx.json {
        println!("from {base}");
        println!("to   new tree {tree_hash} ({files} files)");
        for c in &changes {
            println!("{c}");
        }
    }
    if dry_run {
        if cx.json {
            print_json(
                &serde_json::json!({"status": "dry-run", "from": base, "tree_hash": tree_hash, "changes": changes}),
            );
        } else {
            println!("dry run: nothing applied");
        }
        return OK;
    }
    let Some(root) = root else {
        return FAIL;
    };
    let req = Request::Apply {
        tree_hash,
        root,
        if_match: if_match.map(String::from),
        revoke_live,
    };
    match hub_request(cx, &req) {
        Ok(Response::Applied(r)) => {
            if cx.json {
                print_json(&r);
            } else {
                println!("applied: generation {} ({})", r.generation, r.tree_hash);
                for l in &r.no_longer_allowed {
                    println!(
                        "  no longer allowed: {} {} {}{}",
                        l.kind,
                        l.vm,
                        l.description,
                        if r.revoked { " (revoked)" } else { "" }
                    );
                }
                if !r.no_longer_allowed.is_empty() && !r.revoked {
                    println!("  these stay until closed; --revoke-live tears them down");
                }
            }
            OK
        }
        Ok(other) => hub_unexpected(cx, other),
        Err(c) => c,
    }
}
