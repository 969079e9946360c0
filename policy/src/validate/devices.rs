//! Devices: one owner per PCI function (unless every grant shares it), denies, dead denies.

use std::collections::{BTreeMap, HashMap};

use super::{overlap, subject_matches, Ctx, Entries};
use crate::ast::{Action, Bdf, Effect, Line, Subject};
use crate::diag::Severity;
use crate::eval::{DeviceGrant, FastMap, GroupDef, RuleEntry};

/// The device grants per VM, after denies; reports double grants and dead denies.
pub(super) fn devices(
    cx: &mut Ctx<'_>,
    entries: &Entries<'_>,
    groups: &BTreeMap<String, GroupDef>,
    bad_subject: &[bool],
) -> FastMap<String, Vec<DeviceGrant>> {
    // Devices.
    let mut by_bdf: BTreeMap<Bdf, Vec<usize>> = BTreeMap::new();
    for (i, (e, l)) in entries.iter().enumerate() {
        if let (Effect::Grant, Action::Device { bdf, .. }) = (e.rule.effect, &e.rule.action) {
            if !matches!(e.rule.subject, Subject::Vm(_)) {
                cx.at(
                    Severity::Error,
                    e,
                    l.col(1),
                    format!("pci:{bdf} must be granted to one VM"),
                    "a PCI function has one owner; name the VM",
                );
                continue;
            }
            by_bdf.entry(*bdf).or_default().push(i);
        }
    }
    let mut device_denies: HashMap<Bdf, Vec<&Subject>> = HashMap::new();
    for (d, _) in entries {
        if let (Effect::Deny, Action::Device { bdf, .. }) = (d.rule.effect, &d.rule.action) {
            device_denies.entry(*bdf).or_default().push(&d.rule.subject);
        }
    }
    let mut devices_by_vm: FastMap<String, Vec<DeviceGrant>> = FastMap::default();
    for (bdf, idxs) in &by_bdf {
        let mut sorted: Vec<&(RuleEntry, &Line)> =
            idxs.iter().filter_map(|i| entries.get(*i)).collect();
        sorted.sort_by(|a, b| a.0.at.cmp(&b.0.at));
        let all_shared = sorted
            .iter()
            .all(|(e, _)| matches!(e.rule.action, Action::Device { shared: true, .. }));
        if let Some((first, rest)) = sorted.split_first() {
            for (e, l) in rest {
                if e.rule.subject == first.0.rule.subject {
                    cx.at(
                        Severity::Error,
                        e,
                        l.col(3),
                        format!(
                            "pci:{bdf} granted twice to {} (first at {})",
                            e.rule.subject, first.0.at
                        ),
                        "remove one of the lines",
                    );
                } else if !all_shared {
                    let msg = format!(
                        "pci:{bdf} is already granted to {} at {}",
                        first.0.rule.subject, first.0.at
                    );
                    cx.at(Severity::Error, e, l.col(3), msg, "one owner per PCI function; to let several VMs own it one at a time, add shared=exclusive-run to every grant");
                }
            }
        }
        for (e, _) in &sorted {
            let (
                Subject::Vm(vm),
                Action::Device {
                    id,
                    reset,
                    shared,
                    boot_display,
                    ..
                },
            ) = (&e.rule.subject, &e.rule.action)
            else {
                continue;
            };
            let denied = device_denies
                .get(bdf)
                .is_some_and(|v| v.iter().any(|s| subject_matches(s, vm, groups)));
            if denied {
                continue;
            }
            devices_by_vm
                .entry(vm.clone())
                .or_default()
                .push(DeviceGrant {
                    bdf: *bdf,
                    id: id.unwrap_or(crate::ast::DeviceId::Any),
                    reset: reset.unwrap_or_default(),
                    shared: *shared,
                    boot_display: *boot_display,
                    at: e.at.clone(),
                });
        }
    }
    for v in devices_by_vm.values_mut() {
        v.sort_by_key(|a| a.bdf);
    }
    for (i, (e, l)) in entries.iter().enumerate() {
        if let (Effect::Deny, Action::Device { bdf, .. }) = (e.rule.effect, &e.rule.action) {
            let live = by_bdf.get(bdf).is_some_and(|v| {
                v.iter()
                    .filter_map(|j| entries.get(*j))
                    .any(|(g, _)| overlap(&e.rule.subject, &g.rule.subject, groups))
            });
            if !live && !bad_subject.get(i).copied().unwrap_or(false) {
                cx.at(
                    Severity::Warning,
                    e,
                    l.col(0),
                    format!("dead deny: no grant gives pci:{bdf} to {}", e.rule.subject),
                    "remove the deny, or check the address",
                );
            }
        }
    }
    devices_by_vm
}
