//! `policyctl revoke`: remove exactly matching lines, or explain where access comes from.

use super::grant::edit_error;
use super::{print_json, Ctx, FAIL, OK, USAGE};
use crate::ast::{Action, Effect};
use crate::edit::{remove_rule, RuleKey};
use crate::parse::parse_rule_text;

/// Runs `revoke`.
pub fn run(cx: &Ctx, words: &[String], deny: bool) -> u8 {
    let effect = if deny { Effect::Deny } else { Effect::Grant };
    let key = if words.get(1).map(String::as_str) == Some("quota") {
        if words.len() > 2 {
            eprintln!("error: revoke takes SUBJ quota (no parameters)");
            return USAGE;
        }
        let subject = match parse_rule_text(&format!(
            "grant {} quota vfds=0",
            words.first().map_or("", |s| s.as_str())
        )) {
            Ok(r) => r.subject,
            Err(d) => {
                eprintln!("{d}");
                return USAGE;
            }
        };
        RuleKey {
            effect,
            subject,
            action: Action::Quota {
                shm: None,
                shm_count: None,
                vfds: None,
            },
        }
    } else {
        match parse_rule_text(&format!("deny {}", words.join(" "))) {
            Ok(r) => RuleKey {
                effect,
                subject: r.subject,
                action: r.action,
            },
            Err(mut d) => {
                d.help = Some("revoke takes SUBJ VERB OBJ, without parameters".into());
                eprintln!("{d}");
                return USAGE;
            }
        }
    };
    let roots = cx.roots(None);
    match remove_rule(&roots, &key, &cx.opts) {
        Err(e) => edit_error(cx, e),
        Ok(r) => {
            let what = format!(
                "{} {} {}",
                key.subject,
                key.action.verb(),
                key.action.object()
            );
            if cx.json {
                print_json(&serde_json::json!({
                    "removed": r.removed,
                    "changes": r.edited.as_ref().map(|e| &e.changes),
                    "still_granted": r.still_granted,
                }));
            } else {
                for at in &r.removed {
                    println!("removed {at}");
                }
                if let Some(e) = &r.edited {
                    for c in &e.changes {
                        println!("{c}");
                    }
                }
                if r.removed.is_empty() && r.still_granted.is_empty() {
                    println!(
                        "nothing to revoke: no line `{} {what}`",
                        if deny { "deny" } else { "grant" }
                    );
                }
                for s in &r.still_granted {
                    println!("note: {s}");
                }
                if !r.still_granted.is_empty() {
                    println!("access remains; use `policyctl deny {what}` or edit the group or file named above");
                }
            }
            if r.still_granted.is_empty() {
                OK
            } else {
                FAIL
            }
        }
    }
}
