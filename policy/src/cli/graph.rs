//! `policyctl graph`: Graphviz output of who may connect to whom.

use std::collections::BTreeSet;

use super::{load_current, print_json, Ctx, OK};
use crate::diff;

/// Runs `graph`.
pub fn run(cx: &Ctx, only: Option<&str>) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut edges = BTreeSet::new();
    for (service, prov) in p.services() {
        if only.is_some_and(|o| o != service) {
            continue;
        }
        for vm in p
            .known_vms()
            .iter()
            .map(String::as_str)
            .chain([diff::ANY_VM])
        {
            if p.check_connect(vm, service, None).is_allowed() {
                edges.insert((vm.to_string(), prov.vm.clone(), service.to_string()));
            }
        }
    }
    if cx.json {
        print_json(
            &edges
                .iter()
                .map(|(a, b, s)| serde_json::json!({"from": a, "to": b, "service": s}))
                .collect::<Vec<_>>(),
        );
    } else {
        println!("digraph policy {{");
        for (a, b, s) in &edges {
            println!("  {a:?} -> {b:?} [label={s:?}];");
        }
        println!("}}");
    }
    OK
}
