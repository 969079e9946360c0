//! Connects: each narrows its service's contract (never widens it); dead denies.

use std::collections::{BTreeMap, HashMap};

use super::{overlap, Ctx, Entries};
use crate::ast::{Action, Effect, Subject};
use crate::diag::Severity;
use crate::eval::{
    ConnectGrant, ConnectItem, FastMap, GroupDef, Provider, RuleEntry, SubjectIndex,
};
use crate::parse::MAX_FDS_PER_MESSAGE;
use crate::rights::{FdCaps, FdType};

/// Indexes the connect grants and denies, reporting widening, wrong providers, unknown
/// services and dead denies.
pub(super) fn connects(
    cx: &mut Ctx<'_>,
    entries: &Entries<'_>,
    groups: &BTreeMap<String, GroupDef>,
    bad_subject: &[bool],
    provides: &BTreeMap<String, Vec<usize>>,
    providers: &FastMap<String, Provider>,
) -> SubjectIndex<ConnectItem> {
    // Connects.
    let mut connects = SubjectIndex::new();
    for (e, l) in entries {
        let Action::Connect {
            service,
            provider,
            c2s,
            s2c,
        } = &e.rule.action
        else {
            continue;
        };
        let Some(p) = provides
            .get(service)
            .and_then(|v| v.first())
            .and_then(|i| entries.get(*i))
        else {
            let msg = format!("unknown service `{service}`: no VM provides it");
            cx.at(
                Severity::Warning,
                e,
                l.col(3),
                msg,
                "add `grant VM provide SERVICE …`, or check the spelling (fine for staged policy)",
            );
            if e.rule.effect == Effect::Deny {
                connects.insert(&e.rule.subject, service, deny(e, provider));
            }
            continue;
        };
        let prov_vm = match &p.0.rule.subject {
            Subject::Vm(v) => v.clone(),
            _ => continue,
        };
        if let Some(named) = provider {
            if *named != prov_vm {
                let msg = format!(
                    "`{service}` is provided by {prov_vm} ({}), not {named}",
                    p.0.at
                );
                cx.at(
                    Severity::Error,
                    e,
                    l.col(3),
                    msg,
                    "fix the provider after @, or drop it",
                );
                continue;
            }
        }
        if e.rule.effect == Effect::Deny {
            connects.insert(&e.rule.subject, service, deny(e, provider));
            continue;
        }
        let Some(prov) = providers.get(service).cloned().or_else(|| {
            // Provider denied: validate narrowing against the declared contract anyway.
            match &p.0.rule.action {
                Action::Provide { c2s, s2c, .. } => Some(Provider {
                    vm: prov_vm.clone(),
                    c2s: c2s.unwrap_or(FdCaps::NONE),
                    s2c: s2c.unwrap_or(FdCaps::NONE),
                    max_fds: MAX_FDS_PER_MESSAGE,
                    max_conns: None,
                    at: p.0.at.clone(),
                }),
                _ => None,
            }
        }) else {
            continue;
        };
        let mut ok = true;
        for (key, narrow, contract) in [("c2s", c2s, &prov.c2s), ("s2c", s2c, &prov.s2c)] {
            if let Some(n) = narrow {
                if let Some(extra) = widening(n, contract) {
                    let msg =
                        format!("connect widens the `{service}` contract: {key} adds {extra}");
                    let help = format!(
                        "the contract at {} allows {key}={contract}; a connect may only narrow it",
                        prov.at
                    );
                    cx.at(Severity::Error, e, l.param_col(key), msg, &help);
                    ok = false;
                }
            }
        }
        if ok {
            let g = ConnectGrant {
                at: e.at.clone(),
                c2s: c2s.unwrap_or(prov.c2s).intersect(&prov.c2s),
                s2c: s2c.unwrap_or(prov.s2c).intersect(&prov.s2c),
            };
            connects.insert(&e.rule.subject, service, ConnectItem::Grant(g));
        }
    }
    // Dead connect denies.
    let mut grant_subjects: HashMap<&str, Vec<&Subject>> = HashMap::new();
    for (g, _) in entries {
        if let (Effect::Grant, Action::Connect { service, .. }) = (g.rule.effect, &g.rule.action) {
            grant_subjects
                .entry(service.as_str())
                .or_default()
                .push(&g.rule.subject);
        }
    }
    for (i, (e, l)) in entries.iter().enumerate() {
        if let (Effect::Deny, Action::Connect { service, .. }) = (e.rule.effect, &e.rule.action) {
            if bad_subject.get(i).copied().unwrap_or(false) || !provides.contains_key(service) {
                continue;
            }
            let live = grant_subjects
                .get(service.as_str())
                .is_some_and(|v| v.iter().any(|s| overlap(&e.rule.subject, s, groups)));
            if !live {
                cx.at(
                    Severity::Warning,
                    e,
                    l.col(0),
                    format!(
                        "dead deny: no grant lets {} connect to {service}",
                        e.rule.subject
                    ),
                    "remove the deny, or check the names",
                );
            }
        }
    }
    connects
}

fn widening(narrow: &FdCaps, contract: &FdCaps) -> Option<String> {
    let extra: Vec<String> = FdType::ALL
        .into_iter()
        .filter_map(|t| {
            let d = narrow.get(t).difference(contract.get(t));
            (!d.is_empty()).then(|| format!("{t}:{d}"))
        })
        .collect();
    (!extra.is_empty()).then(|| extra.join(","))
}

/// The index entry of a `deny … connect` rule.
fn deny(e: &RuleEntry, provider: &Option<String>) -> ConnectItem {
    ConnectItem::Deny {
        at: e.at.clone(),
        provider: provider.clone(),
    }
}
