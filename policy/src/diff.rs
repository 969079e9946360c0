//! Semantic diff: what each VM may do before and after, not which text changed.
//!
//! Both policies are flattened into facts (`browser connect wayland@gpu-vm` →
//! `c2s=… s2c=…`), one per VM and permission, after group expansion, denies and
//! specificity; `@any` stands for a VM the policy does not name. The diff is the set
//! difference, with `~` for a fact whose value changed.

use crate::ast::format_size;
use crate::eval::Policy;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A VM the policy does not name, for `@any` facts.
pub const ANY_VM: &str = "@any";

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// A permission that is new.
    Added {
        /// What (`browser connect wayland@gpu-vm`).
        what: String,
        /// Its parameters.
        value: String,
    },
    /// A permission that is gone.
    Removed {
        /// What.
        what: String,
        /// Its parameters.
        value: String,
    },
    /// A permission whose parameters changed.
    Changed {
        /// What.
        what: String,
        /// Before.
        from: String,
        /// After.
        to: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sp = |v: &str| {
            if v.is_empty() {
                String::new()
            } else {
                format!(" {v}")
            }
        };
        match self {
            Change::Added { what, value } => write!(f, "+ {what}{}", sp(value)),
            Change::Removed { what, value } => write!(f, "- {what}{}", sp(value)),
            Change::Changed { what, from, to } => write!(f, "~ {what} {from}→{to}"),
        }
    }
}

/// The facts of a policy for the given VMs (plus `@any`).
pub fn facts(p: &Policy, vms: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let services = p.services();
    let mut all: Vec<&str> = vms.iter().map(|s| s.as_str()).collect();
    all.push(ANY_VM);
    for vm in all {
        for (service, prov) in &services {
            if let Ok(c) = p.check_connect(vm, service, None).outcome {
                out.insert(
                    format!("{vm} connect {service}@{}", prov.vm),
                    format!("c2s={} s2c={} max-fds={}", c.c2s, c.s2c, c.max_fds),
                );
            }
            if prov.vm == vm {
                let conns = prov
                    .max_conns
                    .map(|n| format!(" max-conns={n}"))
                    .unwrap_or_default();
                out.insert(
                    format!("{vm} provide {service}"),
                    format!(
                        "c2s={} s2c={} max-fds={}{conns}",
                        prov.c2s, prov.s2c, prov.max_fds
                    ),
                );
            }
        }
        for d in p.devices_for(vm) {
            let mut v = format!("id={}", d.id);
            if d.reset == crate::ast::Reset::Optional {
                v.push_str(" reset=optional");
            }
            if d.shared {
                v.push_str(" shared=exclusive-run");
            }
            out.insert(format!("{vm} device pci:{}", d.bdf), v);
        }
        let q = p.quota_for(vm);
        for (key, qv, size) in [
            ("shm", &q.shm, true),
            ("shm-count", &q.shm_count, false),
            ("vfds", &q.vfds, false),
        ] {
            if qv.from.is_some() {
                let v = if size {
                    format_size(qv.value)
                } else {
                    qv.value.to_string()
                };
                out.insert(format!("{vm} quota {key}"), v);
            }
        }
    }
    for (name, g) in p.groups() {
        for m in &g.members {
            out.insert(format!("group @{name} member {m}"), String::new());
        }
    }
    out
}

/// The semantic diff from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> Vec<Change> {
    let vms: BTreeSet<String> = old.known_vms().union(new.known_vms()).cloned().collect();
    let a = facts(old, &vms);
    let b = facts(new, &vms);
    let mut out = Vec::new();
    for (k, v) in &a {
        match b.get(k) {
            None => out.push(Change::Removed {
                what: k.clone(),
                value: v.clone(),
            }),
            Some(w) if w != v => out.push(Change::Changed {
                what: k.clone(),
                from: v.clone(),
                to: w.clone(),
            }),
            Some(_) => {}
        }
    }
    for (k, v) in &b {
        if !a.contains_key(k) {
            out.push(Change::Added {
                what: k.clone(),
                value: v.clone(),
            });
        }
    }
    out.sort_by(|x, y| key(x).cmp(key(y)));
    out
}

fn key(c: &Change) -> &str {
    match c {
        Change::Added { what, .. }
        | Change::Removed { what, .. }
        | Change::Changed { what, .. } => what,
    }
}
