//! Semantic validation: parsed files → one immutable [`Policy`], or every error.
//!
//! Checks: groups exist and are flat; one provider per service; one owner per PCI function
//! (unless every grant says `shared=exclusive-run`); connects only narrow the contract;
//! equal-specificity quota conflicts; dead denies and unknown names (warnings, errors with
//! `strict`). IOMMU-group and host-critical checks need sysfs and live in [`crate::sysfs`].

use crate::ast::{Action, Bdf, Effect, Item, Line, ParsedFile, Rule, Subject};
use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::eval::{
    is_system_vm, ConnectGrant, ConnectItem, DeviceGrant, FastMap, GroupDef, Policy, Provider,
    RuleEntry, RuleRef, SubjectIndex,
};
use crate::parse::MAX_FDS_PER_MESSAGE;
use crate::rights::{FdCaps, FdType};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// How strict validation is and what it knows about the host.
#[derive(Clone, Debug, Default)]
pub struct ValidateOptions {
    /// Promote warnings to errors.
    pub strict: bool,
    /// The VMs that exist (e.g. from init's system config). `None`: the VMs the policy
    /// declares (group members, providers, device owners, quota subjects).
    pub known_vms: Option<BTreeSet<String>>,
    /// Physical RAM in bytes; larger `shm=` quotas get a warning.
    pub phys_ram: Option<u64>,
}

/// A validated policy and the warnings validation produced.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The policy.
    pub policy: Policy,
    /// Warnings (never errors).
    pub warnings: Vec<Diagnostic>,
}

struct Ctx<'a> {
    displays: &'a HashMap<String, String>,
    diags: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn at(&mut self, sev: Severity, e: &RuleEntry, col: u32, msg: String, help: &str) {
        let path = self
            .displays
            .get(&*e.at.file)
            .cloned()
            .unwrap_or_else(|| e.at.file.to_string());
        let mut d = Diagnostic::error(&path, e.at.line, col, msg);
        d.severity = sev;
        if !help.is_empty() {
            d.help = Some(help.to_string());
        }
        self.diags.push(d);
    }
}

/// True if some VM could be matched by both subjects.
pub fn overlap(a: &Subject, b: &Subject, groups: &BTreeMap<String, GroupDef>) -> bool {
    let members = |g: &str| groups.get(g).map(|d| &d.members);
    match (a, b) {
        (Subject::Any, Subject::Any) => true,
        (Subject::Any, Subject::Vm(v)) | (Subject::Vm(v), Subject::Any) => !is_system_vm(v),
        (Subject::Any, Subject::Group(g)) | (Subject::Group(g), Subject::Any) => {
            members(g).is_some_and(|m| m.iter().any(|v| !is_system_vm(v)))
        }
        (Subject::Vm(v), Subject::Vm(w)) => v == w,
        (Subject::Vm(v), Subject::Group(g)) | (Subject::Group(g), Subject::Vm(v)) => {
            members(g).is_some_and(|m| m.contains(v))
        }
        (Subject::Group(g), Subject::Group(h)) => match (members(g), members(h)) {
            (Some(m), Some(n)) => m.intersection(n).next().is_some(),
            _ => false,
        },
    }
}

/// True if `subject` matches `vm`.
pub fn subject_matches(subject: &Subject, vm: &str, groups: &BTreeMap<String, GroupDef>) -> bool {
    overlap(subject, &Subject::Vm(vm.to_string()), groups)
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

/// Validate parsed files into a policy. `displays` maps file names to the paths shown in
/// diagnostics; `hash` is the tree hash.
pub fn compile(
    parsed: &[ParsedFile],
    displays: &HashMap<String, String>,
    hash: &str,
    opts: &ValidateOptions,
) -> Result<Compiled, Diagnostics> {
    let mut cx = Ctx {
        displays,
        diags: Vec::new(),
    };
    let mut groups: BTreeMap<String, GroupDef> = BTreeMap::new();
    let mut entries: Vec<(RuleEntry, &Line)> = Vec::new();
    let mut files = Vec::new();
    for f in parsed {
        files.push(f.name.clone());
        let file: Arc<str> = Arc::from(f.name.as_str());
        for l in &f.lines {
            let at = RuleRef {
                file: file.clone(),
                line: l.line,
            };
            match &l.item {
                Item::Group { name, members } => {
                    let g = groups.entry(name.clone()).or_default();
                    g.members.extend(members.iter().cloned());
                    g.defined_at.push(at);
                }
                Item::Rule(r) => entries.push((
                    RuleEntry {
                        rule: r.clone(),
                        at,
                    },
                    l,
                )),
                Item::Version(_) | Item::Include(_) => {}
            }
        }
    }
    // A canonical order, independent of file and line order.
    entries.sort_by_cached_key(|a| (a.0.rule.to_string(), a.0.at.clone()));
    for g in groups.values_mut() {
        g.defined_at.sort();
    }

    // Subjects: groups must exist.
    let mut bad_subject = vec![false; entries.len()];
    for (i, (e, l)) in entries.iter().enumerate() {
        if let Subject::Group(g) = &e.rule.subject {
            if !groups.contains_key(g) {
                cx.at(
                    Severity::Error,
                    e,
                    l.col(1),
                    format!("unknown group @{g}"),
                    "define it with `group NAME VM…` (groups are flat)",
                );
                if let Some(b) = bad_subject.get_mut(i) {
                    *b = true;
                }
            }
        }
    }

    // Duplicates.
    let mut seen: HashMap<String, RuleRef> = HashMap::new();
    for (e, l) in &entries {
        let text = e.rule.to_string();
        if let Some(first) = seen.get(&text) {
            let msg = format!("duplicate rule (same as {first})");
            cx.at(
                Severity::Warning,
                e,
                l.col(0),
                msg,
                "remove one of the two lines",
            );
        } else {
            seen.insert(text, e.at.clone());
        }
    }

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
                .is_some_and(|p| overlap(&e.rule.subject, &Subject::Vm(p.vm.clone()), &groups));
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

    // Connects.
    let mut connects = SubjectIndex::new();
    for (e, l) in &entries {
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
                connects.insert(
                    &e.rule.subject,
                    service,
                    ConnectItem::Deny {
                        at: e.at.clone(),
                        provider: provider.clone(),
                    },
                );
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
            connects.insert(
                &e.rule.subject,
                service,
                ConnectItem::Deny {
                    at: e.at.clone(),
                    provider: provider.clone(),
                },
            );
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
    for (g, _) in &entries {
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
                .is_some_and(|v| v.iter().any(|s| overlap(&e.rule.subject, s, &groups)));
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
    for (d, _) in &entries {
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
                    id, reset, shared, ..
                },
            ) = (&e.rule.subject, &e.rule.action)
            else {
                continue;
            };
            let denied = device_denies
                .get(bdf)
                .is_some_and(|v| v.iter().any(|s| subject_matches(s, vm, &groups)));
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
                    .any(|(g, _)| overlap(&e.rule.subject, &g.rule.subject, &groups))
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

    // Quotas: index, then equal-specificity conflicts per key.
    let mut quotas = SubjectIndex::new();
    for (i, (e, _)) in entries.iter().enumerate() {
        if let Action::Quota { .. } = e.rule.action {
            quotas.insert(&e.rule.subject, "", i as u32);
        }
    }
    check_quota_conflicts(&mut cx, &entries, &groups, opts);

    // Known VMs and unknown names.
    let mut declared: BTreeSet<String> = groups
        .values()
        .flat_map(|g| g.members.iter().cloned())
        .collect();
    for (e, _) in &entries {
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
    for (e, l) in &entries {
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
        for (name, g) in &groups {
            for m in &g.members {
                if !known.contains(m) && !is_system_vm(m) {
                    let at = g.defined_at.first().cloned();
                    if let Some(at) = at {
                        let path = displays
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

    let mut groups_of: FastMap<String, Vec<String>> = FastMap::default();
    for (name, g) in &groups {
        for m in &g.members {
            groups_of.entry(m.clone()).or_default().push(name.clone());
        }
    }

    let mut diags = cx.diags;
    if opts.strict {
        for d in &mut diags {
            d.severity = Severity::Error;
        }
    }
    diags.sort();
    diags.dedup();
    if diags.iter().any(|d| d.is_error()) {
        return Err(Diagnostics(diags));
    }
    let rules: Vec<RuleEntry> = entries.into_iter().map(|(e, _)| e).collect();
    log::debug!(
        "policy {hash}: {} files, {} rules, {} warnings",
        files.len(),
        rules.len(),
        diags.len()
    );
    Ok(Compiled {
        policy: Policy {
            hash: hash.to_string(),
            files,
            rules,
            groups,
            groups_of,
            providers,
            connects,
            deny_provides,
            devices_by_vm,
            quotas,
            known_vms: all_vms,
        },
        warnings: diags,
    })
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

/// Canonical text of a rule (re-exported for the CLI).
pub fn canonical(rule: &Rule) -> String {
    rule.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{compile_with, errors, policy};

    const BASE: &str = "version 1
group apps browser mail term
grant gpu-vm provide wayland c2s=memfd:ro,dmabuf:ro,pipe:w s2c=memfd:ro,pipe:w max-fds=8
grant clip-vm provide clipboard c2s=pipe:w s2c=pipe:w max-fds=1
grant @apps connect wayland@gpu-vm
";

    fn has(d: &[Diagnostic], file: &str, line: u32, col: u32, needle: &str) -> bool {
        d.iter()
            .any(|d| d.path == file && d.line == line && d.col == col && d.message.contains(needle))
    }

    #[test]
    fn two_providers_rejected() {
        let e = errors(&[
            ("a.policy", BASE),
            ("b.policy", "grant net-vm provide wayland\n"),
        ]);
        assert!(
            has(&e, "b.policy", 1, 22, "already has a provider"),
            "{e:?}"
        );
    }

    #[test]
    fn provide_needs_a_vm() {
        let e = errors(&[("a.policy", "group g a b\ngrant @g provide x\n")]);
        assert!(has(&e, "a.policy", 2, 7, "single VM"), "{e:?}");
    }

    #[test]
    fn widening_connect_rejected_at_the_parameter() {
        let e = errors(&[
            ("a.policy", BASE),
            ("b.policy", "grant mail connect wayland c2s=memfd:rw\n"),
        ]);
        assert!(has(&e, "b.policy", 1, 28, "widens"), "{e:?}");
        assert!(e.iter().any(|d| d.message.contains("memfd:write")));
        // Narrowing is fine.
        policy(&[
            ("a.policy", BASE),
            (
                "b.policy",
                "grant mail connect wayland c2s=memfd:read s2c=none\n",
            ),
        ]);
    }

    #[test]
    fn connect_to_the_wrong_provider_rejected() {
        let e = errors(&[
            ("a.policy", BASE),
            ("b.policy", "grant mail connect wayland@net-vm\n"),
        ]);
        assert!(has(&e, "b.policy", 1, 20, "provided by gpu-vm"), "{e:?}");
    }

    #[test]
    fn unknown_group_rejected() {
        let e = errors(&[("a.policy", "grant @nope quota vfds=1\n")]);
        assert!(has(&e, "a.policy", 1, 7, "unknown group @nope"), "{e:?}");
    }

    #[test]
    fn device_granted_twice_rejected() {
        let e = errors(&[
            (
                "a.policy",
                "grant net-vm device pci:0000:03:00.0 id=8086:2723\n",
            ),
            (
                "b.policy",
                "grant usb-vm device pci:0000:03:00.0 id=8086:2723\n",
            ),
        ]);
        assert!(
            has(&e, "b.policy", 1, 21, "already granted to net-vm"),
            "{e:?}"
        );
        let e = errors(&[("a.policy", "grant a device pci:0000:03:00.0 id=any\ngrant a device pci:0000:03:00.0 id=any reset=optional\n")]);
        assert!(
            e.iter().any(|d| d.message.contains("granted twice")),
            "{e:?}"
        );
        let e = errors(&[(
            "a.policy",
            "group g a b\ngrant @g device pci:0000:03:00.0 id=any\n",
        )]);
        assert!(e.iter().any(|d| d.message.contains("one VM")), "{e:?}");
    }

    #[test]
    fn shared_device_allowed_when_every_grant_says_so() {
        let p = policy(&[("a.policy", "grant a device pci:0000:03:00.0 id=any shared=exclusive-run\ngrant b device pci:0000:03:00.0 id=any shared=exclusive-run\n")]);
        assert_eq!(p.devices_for("a").len(), 1);
        assert_eq!(p.devices_for("b").len(), 1);
        errors(&[("a.policy", "grant a device pci:0000:03:00.0 id=any shared=exclusive-run\ngrant b device pci:0000:03:00.0 id=any\n")]);
    }

    #[test]
    fn quota_ties_rejected() {
        let e = errors(&[
            ("a.policy", "grant a quota shm=1MiB\n"),
            ("b.policy", "grant a quota shm=2MiB vfds=3\n"),
        ]);
        assert!(has(&e, "b.policy", 1, 15, "sets quota shm twice"), "{e:?}");
        let e = errors(&[(
            "a.policy",
            "grant @any quota vfds=1\ngrant @any quota vfds=2\n",
        )]);
        assert!(
            e.iter()
                .any(|d| d.message.contains("@any sets quota vfds twice")),
            "{e:?}"
        );
        let two_groups =
            "group g1 a b\ngroup g2 b c\ngrant @g1 quota shm=1MiB\ngrant @g2 quota shm=2MiB\n";
        let e = errors(&[("a.policy", two_groups)]);
        assert!(
            e.iter().any(|d| d.message.contains("b is in @g1 and @g2")),
            "{e:?}"
        );
        // A VM-level setting resolves the tie for that VM.
        let p = policy(&[
            ("a.policy", two_groups),
            ("b.policy", "grant b quota shm=4MiB\n"),
        ]);
        assert_eq!(p.quota_for("b").shm.value, 4 << 20);
        // Different keys do not conflict.
        policy(&[("a.policy", "grant a quota shm=1MiB\ngrant a quota vfds=3\n")]);
    }

    #[test]
    fn dead_deny_warned_and_strict_promotes() {
        let files = [
            ("a.policy", BASE),
            ("b.policy", "deny net-vm connect wayland\n"),
        ];
        let c = compile_with(&files, &ValidateOptions::default()).unwrap();
        assert!(
            has(&c.warnings, "b.policy", 1, 1, "dead deny"),
            "{:?}",
            c.warnings
        );
        let e = compile_with(
            &files,
            &ValidateOptions {
                strict: true,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e
            .0
            .iter()
            .any(|d| d.is_error() && d.message.contains("dead deny")));
        // A deny that hits a grant is not dead.
        let c = compile_with(
            &[
                ("a.policy", BASE),
                ("b.policy", "deny browser connect wayland\n"),
            ],
            &ValidateOptions::default(),
        )
        .unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn unknown_names_warned() {
        let c = compile_with(
            &[
                ("a.policy", BASE),
                (
                    "b.policy",
                    "grant browsr connect wayland\ngrant mail connect clipbord\n",
                ),
            ],
            &ValidateOptions::default(),
        )
        .unwrap();
        assert!(
            has(&c.warnings, "b.policy", 1, 7, "unknown VM `browsr`"),
            "{:?}",
            c.warnings
        );
        assert!(
            has(&c.warnings, "b.policy", 2, 20, "unknown service `clipbord`"),
            "{:?}",
            c.warnings
        );
        let known = ["browser", "mail", "term", "gpu-vm", "clip-vm"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let opts = ValidateOptions {
            known_vms: Some(known),
            strict: true,
            ..Default::default()
        };
        assert!(compile_with(&[("a.policy", BASE)], &opts).is_ok());
        assert!(compile_with(
            &[("a.policy", BASE), ("b.policy", "grant x quota vfds=1\n")],
            &opts
        )
        .is_err());
    }

    #[test]
    fn duplicates_and_ram_warned() {
        let opts = ValidateOptions {
            phys_ram: Some(1 << 30),
            ..Default::default()
        };
        let c = compile_with(
            &[
                ("a.policy", "grant a quota shm=2GiB\n"),
                ("b.policy", "group g a\n"),
            ],
            &opts,
        )
        .unwrap();
        assert!(
            has(&c.warnings, "a.policy", 1, 15, "larger than physical RAM"),
            "{:?}",
            c.warnings
        );
        let c = compile_with(
            &[
                ("a.policy", BASE),
                ("b.policy", "grant @apps connect wayland@gpu-vm\n"),
            ],
            &ValidateOptions::default(),
        )
        .unwrap();
        assert!(
            c.warnings.iter().any(|d| d.message.contains("duplicate")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn deny_provide_removes_the_provider() {
        let p = policy(&[
            ("a.policy", BASE),
            ("b.policy", "deny gpu-vm provide wayland\n"),
        ]);
        assert!(p.provider("wayland").is_none());
        assert!(!p.check_connect("browser", "wayland", None).is_allowed());
        assert!(!p.check_provide("gpu-vm", "wayland").is_allowed());
        assert!(p.check_provide("clip-vm", "clipboard").is_allowed());
    }
}
