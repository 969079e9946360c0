//! `policyctl grant` / `deny`: append one canonical rule line after validating the tree.

use super::{print_diags, print_json, Ctx, FAIL, OK, USAGE};
use crate::ast::Effect;
use crate::edit::{self, add_rule, AddOutcome};
use crate::parse::parse_rule_text;

/// Arguments of `grant` and `deny`.
#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// SUBJ VERB OBJ [key=value…], e.g. `browser connect wayland@gpu-vm`.
    #[arg(required = true, num_args = 2..)]
    words: Vec<String>,
    /// The file (in the first policy directory) to append to.
    #[arg(long, default_value = "50-local.policy")]
    file: String,
    /// Also apply the new tree to the running hub.
    #[arg(long)]
    apply: bool,
}

/// Runs `grant` (`effect` Grant) or `deny`.
pub fn run(cx: &Ctx, effect: Effect, a: &EditArgs) -> u8 {
    let text = format!("{effect} {}", a.words.join(" "));
    let rule = match parse_rule_text(&text) {
        Ok(r) => r,
        Err(d) => {
            eprintln!("{d}");
            return USAGE;
        }
    };
    let roots = cx.roots(None);
    match add_rule(&roots, &a.file, &rule, &cx.opts) {
        Ok(AddOutcome::AlreadyPresent(at)) => {
            let verb = if effect == Effect::Grant {
                "granted"
            } else {
                "denied"
            };
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "already-present", "rule": rule.to_string(), "at": at}),
                );
            } else {
                println!("already {verb} by {at}: {rule}");
            }
            if a.apply {
                return super::apply::run(cx, false, None, false, None);
            }
            OK
        }
        Ok(AddOutcome::Added(e)) => {
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "added", "rule": rule.to_string(), "files": e.files, "changes": e.changes, "warnings": e.warnings}),
                );
            } else {
                print_diags(cx, &e.warnings);
                for f in &e.files {
                    println!("{}: + {rule}", f.display());
                }
                for c in &e.changes {
                    println!("{c}");
                }
                if e.changes.is_empty() {
                    println!("(no change in effective permissions)");
                }
            }
            if a.apply {
                return super::apply::run(cx, false, None, false, None);
            }
            OK
        }
        Err(e) => edit_error(cx, e),
    }
}

/// Prints an edit error; returns the exit code.
pub(crate) fn edit_error(cx: &Ctx, e: edit::EditError) -> u8 {
    if cx.json {
        let diags = match &e {
            edit::EditError::TreeInvalid(d) | edit::EditError::WouldBeInvalid(d) => d.0.clone(),
            _ => Vec::new(),
        };
        print_json(
            &serde_json::json!({"status": "error", "message": e.to_string(), "errors": diags}),
        );
    } else {
        eprintln!("error: {e}");
    }
    FAIL
}
