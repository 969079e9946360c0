//! `policyctl list`: devices, services, quotas, groups, VMs or rules.

use clap::ValueEnum;

use super::{load_current, print_json, Ctx, OK};
use crate::diff;

/// What `list` lists.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ListWhat {
    /// Device grants.
    Devices,
    /// Service providers and their contracts.
    Services,
    /// Each VM's quota.
    Quotas,
    /// Groups and their members.
    Groups,
    /// The VMs the policy names.
    Vms,
    /// Every rule with its location.
    Rules,
}

/// Runs `list`.
pub fn run(cx: &Ctx, what: ListWhat) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let lines: Vec<String> = match what {
        ListWhat::Devices => p
            .all_devices()
            .iter()
            .map(|(vm, d)| {
                format!(
                    "pci:{} {vm} id={}{}  ({})",
                    d.bdf,
                    d.id,
                    if d.shared {
                        " shared=exclusive-run"
                    } else {
                        ""
                    },
                    d.at
                )
            })
            .collect(),
        ListWhat::Services => p
            .services()
            .iter()
            .map(|(s, pr)| {
                format!(
                    "{s} {} c2s={} s2c={} max-fds={}  ({})",
                    pr.vm, pr.c2s, pr.s2c, pr.max_fds, pr.at
                )
            })
            .collect(),
        ListWhat::Quotas => p
            .known_vms()
            .iter()
            .map(String::as_str)
            .chain([diff::ANY_VM])
            .map(|vm| {
                let q = p.quota_for(vm);
                format!(
                    "{vm} shm={} shm-count={} vfds={}",
                    crate::ast::format_size(q.shm.value),
                    q.shm_count.value,
                    q.vfds.value
                )
            })
            .collect(),
        ListWhat::Groups => p
            .groups()
            .iter()
            .map(|(g, d)| {
                format!(
                    "@{g} {}",
                    d.members.iter().cloned().collect::<Vec<_>>().join(" ")
                )
            })
            .collect(),
        ListWhat::Vms => p.known_vms().iter().cloned().collect(),
        ListWhat::Rules => {
            let mut v: Vec<_> = p.rules().iter().collect();
            v.sort_by(|a, b| a.at.cmp(&b.at));
            v.iter().map(|e| format!("{}: {}", e.at, e.rule)).collect()
        }
    };
    if cx.json {
        print_json(&lines);
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    OK
}
