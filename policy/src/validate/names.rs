//! VM names: the VMs a policy declares or that exist, and warnings for unknown ones.

use std::collections::{BTreeMap, BTreeSet};

use super::{Ctx, Entries, ValidateOptions};
use crate::ast::{Action, Effect, Subject};
use crate::diag::{Diagnostic, Severity};
use crate::eval::{is_system_vm, GroupDef};

/// Every VM the policy names; warns of names that are neither declared nor known.
pub(super) fn vm_names(
    cx: &mut Ctx<'_>,
    entries: &Entries<'_>,
    groups: &BTreeMap<String, GroupDef>,
    opts: &ValidateOptions,
) -> BTreeSet<String> {
    // Known VMs and unknown names.
    let mut declared: BTreeSet<String> = groups
        .values()
        .flat_map(|g| g.members.iter().cloned())
        .collect();
    for (e, _) in entries {
        if let (
            Effect::Grant,
            Subject::Vm(v),
            Action::Provide { .. } | Action::Device { .. } | Action::Quota { .. },
        ) = (e.rule.effect, &e.rule.subject, &e.rule.action)
        {
            declared.insert(v.clone());
        }
    }
    let known = opts.known_vms.clone().unwrap_or_else(|| declared.clone());
    let mut all_vms = declared;
    for (e, l) in entries {
        if let Subject::Vm(v) = &e.rule.subject {
            all_vms.insert(v.clone());
            if !known.contains(v) && !is_system_vm(v) {
                let help = if opts.known_vms.is_some() {
                    "no such VM in the system configuration; check the spelling (fine for staged policy)"
                } else {
                    "the VM is in no group and owns, provides and has a quota for nothing; check the spelling (fine for staged policy)"
                };
                cx.at(
                    Severity::Warning,
                    e,
                    l.col(1),
                    format!("unknown VM `{v}`"),
                    help,
                );
            }
        }
    }
    if opts.known_vms.is_some() {
        for (name, g) in groups {
            for m in &g.members {
                if !known.contains(m) && !is_system_vm(m) {
                    let at = g.defined_at.first().cloned();
                    if let Some(at) = at {
                        let path = cx
                            .displays
                            .get(&*at.file)
                            .cloned()
                            .unwrap_or_else(|| at.file.to_string());
                        cx.diags.push(
                            Diagnostic::warning(
                                &path,
                                at.line,
                                0,
                                format!("group @{name}: unknown VM `{m}`"),
                            )
                            .with_help("no such VM in the system configuration"),
                        );
                    }
                }
            }
        }
    }
    all_vms
}
