//! `check` / `explain` and `show`: why a decision came out the way it did.
//!
//! On a denial this names the nearest miss: the deny that won, the grant that is for another
//! subject ("grant on 10-base.policy:14 is for @apps; browser ∉ @apps"), or the contract or
//! narrowing that lacks a type. This text is for the host operator only.

use crate::ast::{Action, Bdf, Effect, Subject};
use crate::eval::{is_system_vm, DenyKind, Policy, RuleRef};
use crate::rights::{Direction, FdType, Rights};
use crate::validate::subject_matches;
use serde::Serialize;

/// The result of `policyctl check`.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// ALLOW or DENY.
    pub allowed: bool,
    /// One-line summary (`browser connect wayland@gpu-vm`).
    pub query: String,
    /// The final masked rights or caps, when allowed.
    pub granted: Option<String>,
    /// The rules that made the decision.
    pub rules: Vec<RuleRef>,
    /// Every grant that matched (with its text).
    pub matching: Vec<String>,
    /// The deny that won, if any.
    pub winning_deny: Vec<String>,
    /// The audit-log reason of a denial.
    pub reason: Option<String>,
    /// On a denial: the nearest misses.
    pub nearest_miss: Vec<String>,
    /// The quota in effect for the subject.
    pub quota: Vec<String>,
}

fn rule_line(p: &Policy, at: &RuleRef) -> String {
    p.rules()
        .iter()
        .find(|e| &e.at == at)
        .map(|e| format!("{at}: {}", e.rule))
        .unwrap_or_else(|| at.to_string())
}

fn quota_lines(p: &Policy, vm: &str) -> Vec<String> {
    let q = p.quota_for(vm);
    let f = |v: &crate::eval::QuotaValue| {
        v.from
            .as_ref()
            .map_or("default 0".to_string(), |r| r.to_string())
    };
    vec![
        format!(
            "shm={} ({})",
            crate::ast::format_size(q.shm.value),
            f(&q.shm)
        ),
        format!("shm-count={} ({})", q.shm_count.value, f(&q.shm_count)),
        format!("vfds={} ({})", q.vfds.value, f(&q.vfds)),
    ]
}

fn why_not(p: &Policy, subject: &Subject, vm: &str) -> String {
    match subject {
        Subject::Vm(v) => format!("is for {v}, not {vm}"),
        Subject::Group(g) => format!("is for @{g}; {vm} ∉ @{g}"),
        Subject::Any if is_system_vm(vm) => {
            format!("is for @any, which never matches the system VM {vm}")
        }
        Subject::Any => {
            let _ = p;
            "is for @any".into()
        }
    }
}

/// A transfer to check on top of a connect.
#[derive(Clone, Copy, Debug)]
pub struct TransferQuery {
    /// The fd type.
    pub fd_type: FdType,
    /// The requested rights.
    pub rights: Rights,
    /// The direction.
    pub dir: Direction,
    /// Fds in the message.
    pub count: u32,
}

/// Explain `vm connect service[@provider]` and, optionally, a transfer on that connection.
pub fn explain_connect(
    p: &Policy,
    vm: &str,
    service: &str,
    provider: Option<&str>,
    transfer: Option<TransferQuery>,
) -> Explanation {
    let obj = match provider {
        Some(pr) => format!("{service}@{pr}"),
        None => service.to_string(),
    };
    let mut ex = Explanation {
        allowed: false,
        query: format!("{vm} connect {obj}"),
        granted: None,
        rules: Vec::new(),
        matching: Vec::new(),
        winning_deny: Vec::new(),
        reason: None,
        nearest_miss: Vec::new(),
        quota: quota_lines(p, vm),
    };
    let groups = p.groups();
    for e in p.rules() {
        if let Action::Connect { service: s, .. } = &e.rule.action {
            if s == service && subject_matches(&e.rule.subject, vm, groups) {
                let line = format!("{}: {}", e.at, e.rule);
                match e.rule.effect {
                    Effect::Grant => ex.matching.push(line),
                    Effect::Deny => ex.winning_deny.push(line),
                }
            }
        }
    }
    let d = p.check_connect(vm, service, provider);
    ex.rules = d.rules.clone();
    let conn = match d.outcome {
        Ok(c) => c,
        Err(den) => {
            ex.reason = Some(den.reason.to_string());
            match den.kind {
                DenyKind::NoProvider => {
                    let denied: Vec<String> = p
                        .rules()
                        .iter()
                        .filter(|e| matches!(&e.rule.action, Action::Provide { service: s, .. } if s == service))
                        .map(|e| format!("{}: {}", e.at, e.rule))
                        .collect();
                    if denied.is_empty() {
                        ex.nearest_miss.push(format!(
                            "no VM provides {service}; add `grant VM provide {service} …`"
                        ));
                    } else {
                        ex.nearest_miss.push(format!(
                            "the provider of {service} is denied: {}",
                            denied.join("; ")
                        ));
                    }
                }
                DenyKind::WrongProvider => {
                    if let Some(pr) = p.provider(service) {
                        ex.nearest_miss
                            .push(format!("{service} is provided by {} ({})", pr.vm, pr.at));
                    }
                }
                DenyKind::DeniedByRule => {
                    ex.nearest_miss.push(format!(
                        "deny beats grant: {}",
                        d.rules
                            .iter()
                            .map(|r| rule_line(p, r))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
                _ => {
                    let mut any = false;
                    for e in p.rules() {
                        if let (Effect::Grant, Action::Connect { service: s, .. }) =
                            (e.rule.effect, &e.rule.action)
                        {
                            if s == service {
                                any = true;
                                ex.nearest_miss.push(format!(
                                    "grant on {} {}",
                                    e.at,
                                    why_not(p, &e.rule.subject, vm)
                                ));
                            }
                        }
                    }
                    if !any {
                        ex.nearest_miss
                            .push(format!("no rule grants connect to {service} at all"));
                    }
                }
            }
            return ex;
        }
    };
    let Some(t) = transfer else {
        ex.allowed = true;
        ex.granted = Some(format!(
            "c2s={} s2c={} max-fds={}",
            conn.c2s, conn.s2c, conn.max_fds
        ));
        return ex;
    };
    ex.query = format!(
        "{} --fd {}:{} --dir {} --count {}",
        ex.query, t.fd_type, t.rights, t.dir, t.count
    );
    let td = p.check_transfer(&conn, t.dir, t.fd_type, t.rights, t.count);
    match td.outcome {
        Ok(r) => {
            ex.allowed = true;
            let dropped = t.rights.difference(r);
            ex.granted = Some(if dropped.is_empty() {
                format!("{}:{r}", t.fd_type)
            } else {
                format!("{}:{r} (reduced by policy: {dropped} dropped)", t.fd_type)
            });
        }
        Err(den) => {
            ex.reason = Some(den.reason.to_string());
            let prov = p.provider(service);
            let contract = prov.map(|pr| match t.dir {
                Direction::C2s => pr.c2s,
                Direction::S2c => pr.s2c,
            });
            match den.kind {
                DenyKind::TooManyFds => ex.nearest_miss.push(format!(
                    "max-fds={} ({})",
                    conn.max_fds,
                    prov.map_or(String::new(), |pr| pr.at.to_string())
                )),
                DenyKind::InvalidRights => {
                    let bad = t.rights.difference(t.fd_type.valid_rights());
                    ex.nearest_miss.push(if bad.is_empty() {
                        "a pipe end is either a read end or a write end".to_string()
                    } else {
                        format!("{bad} is not a right of {}", t.fd_type)
                    })
                }
                _ => {
                    let at = prov.map_or(String::new(), |pr| pr.at.to_string());
                    match contract {
                        Some(c) if c.get(t.fd_type).is_empty() => ex.nearest_miss.push(format!(
                            "{service} contract has no {} in {} ({at})",
                            t.fd_type, t.dir
                        )),
                        Some(c)
                            if t.rights
                                .intersection(c.get(t.fd_type))
                                .difference(Rights::TRANSFER | Rights::DUP)
                                .is_empty() =>
                        {
                            ex.nearest_miss.push(format!(
                                "{service} contract allows only {}:{} in {} ({at})",
                                t.fd_type,
                                c.get(t.fd_type),
                                t.dir
                            ))
                        }
                        _ => ex.nearest_miss.push(format!(
                            "the connect grant narrows {} to {} ({})",
                            t.dir,
                            conn.caps(t.dir),
                            conn.rules
                                .iter()
                                .skip(1)
                                .map(|r| r.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    }
                }
            }
        }
    }
    ex
}

/// Explain `vm device pci:BDF`.
pub fn explain_device(p: &Policy, vm: &str, bdf: Bdf) -> Explanation {
    let d = p.check_device(vm, bdf);
    let mut ex = Explanation {
        allowed: d.is_allowed(),
        query: format!("{vm} device pci:{bdf}"),
        granted: d.outcome.as_ref().ok().map(|g| format!("id={}", g.id)),
        rules: d.rules.clone(),
        matching: Vec::new(),
        winning_deny: Vec::new(),
        reason: d.outcome.as_ref().err().map(|e| e.reason.to_string()),
        nearest_miss: Vec::new(),
        quota: Vec::new(),
    };
    for e in p.rules() {
        if let Action::Device { bdf: b, .. } = &e.rule.action {
            if *b != bdf {
                continue;
            }
            let matches = subject_matches(&e.rule.subject, vm, p.groups())
                || e.rule.subject == Subject::Vm(vm.to_string());
            let line = format!("{}: {}", e.at, e.rule);
            match (e.rule.effect, matches) {
                (Effect::Grant, true) => ex.matching.push(line),
                (Effect::Deny, true) => ex.winning_deny.push(line),
                (Effect::Grant, false) => ex.nearest_miss.push(format!(
                    "grant on {} {}",
                    e.at,
                    why_not(p, &e.rule.subject, vm)
                )),
                _ => {}
            }
        }
    }
    if !ex.allowed && ex.nearest_miss.is_empty() && ex.winning_deny.is_empty() {
        ex.nearest_miss
            .push(format!("no rule grants pci:{bdf} to anyone"));
    }
    if !ex.winning_deny.is_empty() && !ex.allowed {
        ex.nearest_miss.push("deny beats grant".into());
    }
    ex
}

/// Explain `vm provide service`.
pub fn explain_provide(p: &Policy, vm: &str, service: &str) -> Explanation {
    let d = p.check_provide(vm, service);
    let mut miss = Vec::new();
    if let Err(den) = &d.outcome {
        miss.push(den.reason.to_string());
    }
    Explanation {
        allowed: d.is_allowed(),
        query: format!("{vm} provide {service}"),
        granted: d
            .outcome
            .as_ref()
            .ok()
            .map(|pr| format!("c2s={} s2c={} max-fds={}", pr.c2s, pr.s2c, pr.max_fds)),
        rules: d.rules.clone(),
        matching: d.rules.iter().map(|r| rule_line(p, r)).collect(),
        winning_deny: Vec::new(),
        reason: d.outcome.as_ref().err().map(|e| e.reason.to_string()),
        nearest_miss: miss,
        quota: Vec::new(),
    }
}

/// What `show VM` prints: every permission of a VM with provenance.
#[derive(Clone, Debug, Serialize)]
pub struct VmReport {
    /// The VM.
    pub vm: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// `connect service@provider c2s=… s2c=…  (file:line, …)`.
    pub connects: Vec<String>,
    /// Services it provides.
    pub provides: Vec<String>,
    /// Devices it may own.
    pub devices: Vec<String>,
    /// Its quota.
    pub quota: Vec<String>,
    /// Denies that apply to it.
    pub denies: Vec<String>,
}

/// The effective permissions of `vm`.
pub fn show_vm(p: &Policy, vm: &str) -> VmReport {
    let refs = |r: &[RuleRef]| {
        r.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut connects = Vec::new();
    let mut provides = Vec::new();
    for (service, prov) in p.services() {
        if let Ok(c) = p.check_connect(vm, service, None).outcome {
            connects.push(format!(
                "connect {service}@{} c2s={} s2c={}  ({})",
                prov.vm,
                c.c2s,
                c.s2c,
                refs(&c.rules)
            ));
        }
        if prov.vm == vm {
            provides.push(format!(
                "provide {service} c2s={} s2c={} max-fds={}  ({})",
                prov.c2s, prov.s2c, prov.max_fds, prov.at
            ));
        }
    }
    let devices = p
        .devices_for(vm)
        .iter()
        .map(|d| format!("device pci:{} id={}  ({})", d.bdf, d.id, d.at))
        .collect();
    let denies = p
        .rules()
        .iter()
        .filter(|e| {
            e.rule.effect == Effect::Deny && subject_matches(&e.rule.subject, vm, p.groups())
        })
        .map(|e| format!("{}  ({})", e.rule, e.at))
        .collect();
    VmReport {
        vm: vm.to_string(),
        groups: p.groups_of(vm).iter().map(|g| format!("@{g}")).collect(),
        connects,
        provides,
        devices,
        quota: quota_lines(p, vm),
        denies,
    }
}
