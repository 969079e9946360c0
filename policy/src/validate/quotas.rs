//! Quotas: indexed by subject; equal-specificity settings of one key are errors.

use std::collections::BTreeMap;

use super::{Ctx, Entries, ValidateOptions};
use crate::ast::{Action, Line, Subject};
use crate::diag::Severity;
use crate::eval::{GroupDef, RuleEntry, SubjectIndex};

/// Indexes the quota rules and reports conflicts.
pub(super) fn quotas(
    cx: &mut Ctx<'_>,
    entries: &Entries<'_>,
    groups: &BTreeMap<String, GroupDef>,
    opts: &ValidateOptions,
) -> SubjectIndex<u32> {
    // Quotas: index, then equal-specificity conflicts per key.
    let mut quotas = SubjectIndex::new();
    for (i, (e, _)) in entries.iter().enumerate() {
        if let Action::Quota { .. } = e.rule.action {
            quotas.insert(&e.rule.subject, "", i as u32);
        }
    }
    check_quota_conflicts(cx, entries, groups, opts);
    quotas
}

fn quota_key(a: &Action, k: usize) -> Option<u64> {
    match (a, k) {
        (Action::Quota { shm, .. }, 0) => *shm,
        (Action::Quota { shm_count, .. }, 1) => *shm_count,
        (Action::Quota { vfds, .. }, 2) => *vfds,
        _ => None,
    }
}

const QUOTA_KEYS: [&str; 3] = ["shm", "shm-count", "vfds"];

fn check_quota_conflicts(
    cx: &mut Ctx<'_>,
    entries: &[(RuleEntry, &Line)],
    groups: &BTreeMap<String, GroupDef>,
    opts: &ValidateOptions,
) {
    for (k, key) in QUOTA_KEYS.iter().enumerate() {
        // Same subject setting the same key twice.
        let mut by_subject: BTreeMap<&Subject, Vec<&(RuleEntry, &Line)>> = BTreeMap::new();
        for pair in entries {
            if quota_key(&pair.0.rule.action, k).is_some() {
                by_subject
                    .entry(&pair.0.rule.subject)
                    .or_default()
                    .push(pair);
            }
        }
        for (subj, list) in &by_subject {
            let mut list = list.clone();
            list.sort_by(|a, b| a.0.at.cmp(&b.0.at));
            if let Some((first, rest)) = list.split_first() {
                for (e, l) in rest {
                    let msg = format!("{subj} sets quota {key} twice (also at {})", first.0.at);
                    cx.at(
                        Severity::Error,
                        e,
                        l.param_col(key),
                        msg,
                        "equal-specificity settings conflict; keep one",
                    );
                }
            }
        }
        // Two groups setting the same key for a shared member without a VM-level setting.
        let group_rules: Vec<(&String, &(RuleEntry, &Line))> = by_subject
            .iter()
            .filter_map(|(s, l)| match s {
                Subject::Group(g) => l.first().map(|p| (g, *p)),
                _ => None,
            })
            .collect();
        for (a, (ga, ea)) in group_rules.iter().enumerate() {
            for (gb, eb) in group_rules.iter().skip(a + 1) {
                let (Some(ma), Some(mb)) = (groups.get(*ga), groups.get(*gb)) else {
                    continue;
                };
                for vm in ma.members.intersection(&mb.members) {
                    if by_subject.contains_key(&Subject::Vm(vm.clone())) {
                        continue;
                    }
                    let (later, earlier) = if ea.0.at > eb.0.at {
                        (ea, eb)
                    } else {
                        (eb, ea)
                    };
                    let msg = format!(
                        "{vm} is in @{ga} and @{gb}, which both set quota {key} ({} and {})",
                        earlier.0.at, later.0.at
                    );
                    let help = format!("equal specificity is an error, never last-wins; give {vm} its own `grant {vm} quota {key}=…`");
                    cx.at(
                        Severity::Error,
                        &later.0,
                        later.1.param_col(key),
                        msg,
                        &help,
                    );
                }
            }
        }
        if k == 0 {
            if let Some(ram) = opts.phys_ram {
                for (e, l) in entries {
                    if quota_key(&e.rule.action, 0).is_some_and(|v| v > ram) {
                        let msg = format!(
                            "shm quota is larger than physical RAM ({})",
                            crate::ast::format_size(ram)
                        );
                        cx.at(
                            Severity::Warning,
                            e,
                            l.param_col("shm"),
                            msg,
                            "the memfd server can never grant that much",
                        );
                    }
                }
            }
        }
    }
}
