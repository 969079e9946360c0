//! `policyctl apply`: validate, show the diff, then ask the hub to swap generations
//! atomically (compare-and-swap with `--if-match`).

use std::collections::HashMap;
use std::path::Path;

use super::hub::{hub_request, hub_unexpected};
use super::{print_diags, print_json, Ctx, FAIL, OK, USAGE};
use crate::control::{Request, Response};
use crate::{diff, Policy, PolicyTree, RootDir};

fn valid_hash(h: &str) -> bool {
    h.strip_prefix("sha256:").is_some_and(|x| {
        x.len() == 64
            && x.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
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
    if let Some(h) = if_match {
        if !valid_hash(h) {
            eprintln!("error: --if-match takes sha256:<64 lowercase hex digits>, as printed by `policyctl validate` or `status`");
            return USAGE;
        }
    }
    let roots = cx.roots(None);
    let (tree, new) = match cx.load_overrides(&roots, &HashMap::new(), true) {
        Ok(x) => x,
        Err(c) => return c,
    };
    print_diags(cx, &new.warnings);
    let from_roots = match from {
        Some(d) => RootDir::staging(d),
        None => RootDir::defaults(),
    };
    let from_tree = PolicyTree::load(&from_roots);
    // Compare-and-swap, first step: refuse a stale hash before contacting anything.
    if let Some(h) = if_match {
        if h != from_tree.hash {
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "refused", "reason": "stale --if-match", "current": from_tree.hash, "if_match": h}),
                );
            } else {
                eprintln!("error: refused: stale --if-match: the current tree is {}, not {h}; review `policyctl diff` and retry with the current hash", from_tree.hash);
            }
            return FAIL;
        }
    }
    let changes = match from_tree.compile(&cx.opts) {
        Ok(old) => diff::diff(&old.policy, &new.policy),
        Err(_) => diff::diff(&Policy::deny_all(), &new.policy),
    };
    if !cx.json {
        println!("new tree {} ({} files)", tree.hash, tree.files.len());
        for c in &changes {
            println!("{c}");
        }
    }
    if dry_run {
        if cx.json {
            print_json(
                &serde_json::json!({"status": "dry-run", "tree_hash": tree.hash, "changes": changes}),
            );
        } else {
            println!("dry run: nothing applied");
        }
        return OK;
    }
    let Some(root) = tree.primary_root().map(Path::to_path_buf) else {
        return FAIL;
    };
    let req = Request::Apply {
        tree_hash: tree.hash.clone(),
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
