//! `policyctl show`: effective permissions of a VM, a group or a service.

use super::{load_current, print_json, Ctx, FAIL, OK};
use crate::ast::Subject;
use crate::diff;
use crate::explain::show_vm;

/// Runs `show`.
pub fn run(cx: &Ctx, what: Option<&str>) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let print_vm = |vm: &str| {
        let r = show_vm(&p, vm);
        if cx.json {
            print_json(&r);
            return;
        }
        println!(
            "{vm}{}",
            if r.groups.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.groups.join(" "))
            }
        );
        for l in r.connects.iter().chain(&r.provides).chain(&r.devices) {
            println!("  {l}");
        }
        for d in &r.denies {
            println!("  {d}");
        }
        for q in &r.quota {
            println!("  quota {q}");
        }
    };
    match what {
        None => {
            for vm in p.known_vms() {
                print_vm(vm);
            }
            print_vm(diff::ANY_VM);
        }
        Some(g) if g.starts_with('@') && g != "@any" => {
            let name = g.trim_start_matches('@');
            let Some(def) = p.groups().get(name) else {
                eprintln!("error: no group {g}");
                return FAIL;
            };
            let rules: Vec<String> = p
                .rules()
                .iter()
                .filter(|e| e.rule.subject == Subject::Group(name.into()))
                .map(|e| format!("{}: {}", e.at, e.rule))
                .collect();
            if cx.json {
                print_json(
                    &serde_json::json!({"group": name, "members": def.members, "defined_at": def.defined_at, "rules": rules}),
                );
            } else {
                println!(
                    "{g}: {}  ({})",
                    def.members.iter().cloned().collect::<Vec<_>>().join(" "),
                    def.defined_at
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                for r in rules {
                    println!("  {r}");
                }
            }
        }
        Some(s) if p.provider(s).is_some() => {
            let Some(prov) = p.provider(s) else {
                return FAIL;
            };
            let mut who = Vec::new();
            for vm in p
                .known_vms()
                .iter()
                .map(String::as_str)
                .chain([diff::ANY_VM])
            {
                if let Ok(c) = p.check_connect(vm, s, None).outcome {
                    who.push(format!(
                        "{vm} c2s={} s2c={}  ({})",
                        c.c2s,
                        c.s2c,
                        c.rules
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if cx.json {
                print_json(&serde_json::json!({"service": s, "provider": prov, "clients": who}));
            } else {
                println!(
                    "{s}: provided by {} c2s={} s2c={} max-fds={}  ({})",
                    prov.vm, prov.c2s, prov.s2c, prov.max_fds, prov.at
                );
                for w in who {
                    println!("  {w}");
                }
            }
        }
        Some(vm) => print_vm(vm),
    }
    OK
}
