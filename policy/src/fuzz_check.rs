//! The body of the `parse` fuzz target, shared with a plain test that runs the seed inputs.
//!
//! Arbitrary bytes are parsed as one file, then split on `0xff` into up to eight files of one
//! tree (so includes resolve among them) and validated. A valid tree is evaluated, and every
//! rule's canonical text must parse back to the same rule. Any panic is a bug.

use crate::parse::{parse_bytes, parse_rule_text};
use crate::{PolicyTree, ValidateOptions};

/// Exercise the parser, validator and evaluator on `data`. Panics only on a bug (a failed
/// round-trip); malformed input is reported as diagnostics, never a panic.
pub fn exercise(data: &[u8]) {
    let _ = parse_bytes("fuzz.policy", "fuzz.policy", data);
    let sources: Vec<(String, Vec<u8>)> = data
        .split(|b| *b == 0xff)
        .take(8)
        .enumerate()
        .map(|(i, part)| {
            let name = if i == 0 {
                "10-a.policy".to_string()
            } else {
                format!("sub/{i}.policy")
            };
            (name, part.to_vec())
        })
        .collect();
    let tree = PolicyTree::from_sources(&sources);
    let Ok(c) = tree.compile(&ValidateOptions::default()) else {
        return;
    };
    let p = c.policy;
    for vm in ["browser", "host", "a"] {
        for (service, _) in p.services() {
            if let Ok(conn) = p.check_connect(vm, service, None).outcome {
                for t in crate::FdType::ALL {
                    let _ =
                        p.check_transfer(&conn, crate::Direction::C2s, t, crate::Rights::ALL, 1);
                }
            }
        }
        let _ = p.quota_for(vm);
        let _ = p.devices_for(vm);
    }
    for e in p.rules() {
        let text = e.rule.to_string();
        match parse_rule_text(&text) {
            Ok(r) if r == e.rule => {}
            other => panic!("canonical text {text:?} does not round-trip: {other:?}"),
        }
    }
}
