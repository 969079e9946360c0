//! `policyctl fmt`: rewrite the first policy directory's files in canonical form.

use super::{print_diags, print_json, Ctx, FAIL, OK};
use crate::{edit, fmt as pfmt, PolicyTree};

/// Runs `fmt`.
pub fn run(cx: &Ctx, check: bool) -> u8 {
    let roots = cx.roots(None);
    let tree = PolicyTree::load(&roots);
    let mut code = OK;
    let mut changed = Vec::new();
    for f in &tree.files {
        if f.root != Some(0) {
            continue;
        }
        match pfmt::format_file(&f.display, &f.bytes) {
            Err(d) => {
                print_diags(cx, &d);
                code = FAIL;
            }
            Ok(out) if out.as_bytes() != f.bytes.as_slice() => {
                changed.push(f.display.clone());
                if check {
                    code = FAIL;
                } else if let Some(root) = roots.first() {
                    if let Err(e) = edit::atomic_write(&root.path.join(&f.rel), out.as_bytes()) {
                        eprintln!("error: {e}");
                        code = FAIL;
                    }
                }
            }
            Ok(_) => {}
        }
    }
    if cx.json {
        print_json(&serde_json::json!({"check": check, "changed": changed}));
    } else {
        for c in &changed {
            println!(
                "{} {c}",
                if check {
                    "would reformat"
                } else {
                    "reformatted"
                }
            );
        }
    }
    code
}
