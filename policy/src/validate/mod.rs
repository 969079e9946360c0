//! Semantic validation: parsed files → one immutable [`Policy`], or every error.
//!
//! Checks: groups exist and are flat; one provider per service; one owner per PCI function
//! (unless every grant says `shared=exclusive-run`); connects only narrow the contract;
//! equal-specificity quota conflicts; dead denies and unknown names (warnings, errors with
//! `strict`). IOMMU-group and host-critical checks need sysfs and live in [`crate::sysfs`].

use crate::ast::{Item, Line, ParsedFile, Rule, Subject};
use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::eval::{is_system_vm, FastMap, GroupDef, Policy, RuleEntry, RuleRef};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

mod connects;
mod devices;
mod names;
mod providers;
mod quotas;

use providers::Providers;

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

/// The parsed rules in canonical order, each with its line (for columns).
type Entries<'a> = [(RuleEntry, &'a Line)];

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

    let Providers {
        provides,
        providers,
        deny_provides,
    } = providers::providers(&mut cx, &entries, &groups, &bad_subject);
    let connects = connects::connects(
        &mut cx,
        &entries,
        &groups,
        &bad_subject,
        &provides,
        &providers,
    );
    let devices_by_vm = devices::devices(&mut cx, &entries, &groups, &bad_subject);
    let quotas = quotas::quotas(&mut cx, &entries, &groups, opts);
    let all_vms = names::vm_names(&mut cx, &entries, &groups, opts);

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
