//! Providers: one VM per service (`grant VM provide S`), and the denies that take one away.

use std::collections::BTreeMap;

use super::{overlap, Ctx, Entries};
use crate::ast::{Action, Effect, Line, Subject};
use crate::diag::Severity;
use crate::eval::{FastMap, GroupDef, Provider, RuleEntry, SubjectIndex};
use crate::parse::MAX_FDS_PER_MESSAGE;
use crate::rights::FdCaps;

/// The providers and their rule indexes.
pub(super) struct Providers {
    /// Service → the entries granting its provide (the first is the provider).
    pub provides: BTreeMap<String, Vec<usize>>,
    /// Service → its provider, after `deny … provide`.
    pub providers: FastMap<String, Provider>,
    /// The `deny … provide` rules.
    pub deny_provides: SubjectIndex<u32>,
}

/// Collects the providers, reporting second providers and dead denies.
pub(super) fn providers(
    cx: &mut Ctx<'_>,
    entries: &Entries<'_>,
    groups: &BTreeMap<String, GroupDef>,
    bad_subject: &[bool],
) -> Providers {
    // Providers.
    let mut provides: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (e, l)) in entries.iter().enumerate() {
        if let (Effect::Grant, Action::Provide { service, .. }) = (e.rule.effect, &e.rule.action) {
            if !matches!(e.rule.subject, Subject::Vm(_)) {
                cx.at(
                    Severity::Error,
                    e,
                    l.col(1),
                    format!("`provide {service}` needs a single VM as subject"),
                    "a service has exactly one provider VM",
                );
                continue;
            }
            provides.entry(service.clone()).or_default().push(i);
        }
    }
    let mut providers: FastMap<String, Provider> = FastMap::default();
    for (service, idxs) in &provides {
        let mut sorted: Vec<&(RuleEntry, &Line)> =
            idxs.iter().filter_map(|i| entries.get(*i)).collect();
        sorted.sort_by(|a, b| a.0.at.cmp(&b.0.at));
        let Some((first, rest)) = sorted.split_first() else {
            continue;
        };
        for (e, l) in rest {
            let msg = format!(
                "service `{service}` already has a provider: {} at {}",
                first.0.rule.subject, first.0.at
            );
            cx.at(
                Severity::Error,
                e,
                l.col(3),
                msg,
                "each service has exactly one provider; remove one of the provide rules",
            );
        }
        if let (
            Subject::Vm(vm),
            Action::Provide {
                c2s,
                s2c,
                max_fds,
                max_conns,
                ..
            },
        ) = (&first.0.rule.subject, &first.0.rule.action)
        {
            providers.insert(
                service.clone(),
                Provider {
                    vm: vm.clone(),
                    c2s: c2s.unwrap_or(FdCaps::NONE),
                    s2c: s2c.unwrap_or(FdCaps::NONE),
                    max_fds: max_fds.unwrap_or(MAX_FDS_PER_MESSAGE),
                    max_conns: *max_conns,
                    at: first.0.at.clone(),
                },
            );
        }
    }
    // Deny provide.
    let mut deny_provides = SubjectIndex::new();
    for (i, (e, l)) in entries.iter().enumerate() {
        if let (Effect::Deny, Action::Provide { service, .. }) = (e.rule.effect, &e.rule.action) {
            deny_provides.insert(&e.rule.subject, service, i as u32);
            let hit = providers
                .get(service)
                .is_some_and(|p| overlap(&e.rule.subject, &Subject::Vm(p.vm.clone()), groups));
            if hit {
                providers.remove(service);
            } else if !bad_subject.get(i).copied().unwrap_or(false) {
                cx.at(
                    Severity::Warning,
                    e,
                    l.col(0),
                    format!(
                        "dead deny: no grant lets {} provide {service}",
                        e.rule.subject
                    ),
                    "remove the deny, or check the names",
                );
            }
        }
    }
    Providers {
        provides,
        providers,
        deny_provides,
    }
}
