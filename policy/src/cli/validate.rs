//! `policyctl validate`: parse and check the whole tree (with files standing in).

use std::collections::HashMap;
use std::path::PathBuf;

use super::{print_diags, print_json, Ctx, FAIL, OK, USAGE};

/// Runs `validate`.
pub fn run(cx: &Ctx, files: &[PathBuf]) -> u8 {
    let roots = cx.roots(None);
    let mut ov = HashMap::new();
    for f in files {
        let Some(root) = roots.first() else {
            return USAGE;
        };
        let Some(name) = f.file_name() else {
            eprintln!("error: {} is not a file", f.display());
            return USAGE;
        };
        match std::fs::read(f) {
            Ok(b) => {
                ov.insert(root.path.join(name), b);
            }
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", f.display());
                return FAIL;
            }
        }
    }
    match cx.load_overrides(&roots, &ov, true) {
        Err(code) => code,
        Ok((tree, c)) => {
            if cx.json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "tree_hash": tree.hash,
                    "files": tree.files.iter().map(|f| &f.name).collect::<Vec<_>>(),
                    "rules": c.policy.rules().len(),
                    "errors": [],
                    "warnings": c.warnings,
                }));
            } else {
                print_diags(cx, &c.warnings);
                println!(
                    "ok: {} files, {} rules, {} warnings; tree {}",
                    tree.files.len(),
                    c.policy.rules().len(),
                    c.warnings.len(),
                    tree.hash
                );
            }
            OK
        }
    }
}
