//! The validated, immutable [`Policy`] (one generation) and its evaluation API.
//!
//! Every check looks rules up by subject (the VM, each of its groups, `@any`) and object (the
//! service, the PCI function), so its cost does not grow with the number of rules. Every
//! [`Decision`] carries the rules that made it; a denial carries a reason for the host audit
//! log, which is never shown to guests (they all get the same error, see [`GuestError`]).

use crate::ast::Bdf;
use crate::rights::{Direction, FdCaps, FdType, Rights};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

mod decision;
mod index;

pub use decision::*;
pub(crate) use index::*;

/// A group and where its members were declared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDef {
    /// The members.
    pub members: BTreeSet<String>,
    /// The `group` lines.
    pub defined_at: Vec<RuleRef>,
}

/// One validated, immutable policy generation.
#[derive(Clone, Debug)]
pub struct Policy {
    pub(crate) hash: String,
    pub(crate) files: Vec<String>,
    pub(crate) rules: Vec<RuleEntry>,
    pub(crate) groups: BTreeMap<String, GroupDef>,
    pub(crate) groups_of: FastMap<String, Vec<String>>,
    pub(crate) providers: FastMap<String, Provider>,
    /// Connect grants and denies, object = service.
    pub(crate) connects: SubjectIndex<ConnectItem>,
    /// Deny provide rules, object = service.
    pub(crate) deny_provides: SubjectIndex<u32>,
    /// Device grants per VM (after denies).
    pub(crate) devices_by_vm: FastMap<String, Vec<DeviceGrant>>,
    /// Quota rules, object = "".
    pub(crate) quotas: SubjectIndex<u32>,
    pub(crate) known_vms: BTreeSet<String>,
}

const NO_GROUPS: &[String] = &[];

impl Policy {
    /// An empty policy: denies everything (what a host runs when its tree is invalid at boot).
    pub fn deny_all() -> Policy {
        Policy {
            hash: "sha256:deny-all".into(),
            files: Vec::new(),
            rules: Vec::new(),
            groups: BTreeMap::new(),
            groups_of: FastMap::default(),
            providers: FastMap::default(),
            connects: SubjectIndex::new(),
            deny_provides: SubjectIndex::new(),
            devices_by_vm: FastMap::default(),
            quotas: SubjectIndex::new(),
            known_vms: BTreeSet::new(),
        }
    }

    /// The tree hash, `sha256:<hex>`.
    pub fn tree_hash(&self) -> &str {
        &self.hash
    }

    /// The files the policy was built from.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Every grant and deny with provenance.
    pub fn rules(&self) -> &[RuleEntry] {
        &self.rules
    }

    /// The groups.
    pub fn groups(&self) -> &BTreeMap<String, GroupDef> {
        &self.groups
    }

    /// The groups `vm` is a member of.
    pub fn groups_of(&self, vm: &str) -> &[String] {
        self.groups_of.get(vm).map_or(NO_GROUPS, |v| v.as_slice())
    }

    /// Every VM the policy names (or that validation was told about).
    pub fn known_vms(&self) -> &BTreeSet<String> {
        &self.known_vms
    }

    /// The provider of `service`, if any.
    pub fn provider(&self, service: &str) -> Option<&Provider> {
        self.providers.get(service)
    }

    /// Every service with its provider, sorted by service name.
    pub fn services(&self) -> Vec<(&str, &Provider)> {
        let mut v: Vec<_> = self
            .providers
            .iter()
            .map(|(k, p)| (k.as_str(), p))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    fn rule_ref(&self, idx: u32) -> Option<RuleRef> {
        self.rules.get(idx as usize).map(|r| r.at.clone())
    }

    /// May `vm` register as the provider of `service`?
    pub fn check_provide(&self, vm: &str, service: &str) -> Decision<Provider> {
        match self.providers.get(service) {
            Some(p) if p.vm == vm => Decision {
                outcome: Ok(p.clone()),
                rules: vec![p.at.clone()],
            },
            Some(p) => Decision::deny(
                DenyKind::NoGrant,
                format!("{service} is provided by {}, not {vm}", p.vm),
                vec![p.at.clone()],
            ),
            None => {
                let groups = self.groups_of(vm);
                let denies = self.deny_provides.lookup(vm, groups, service);
                let rules: Vec<RuleRef> = denies
                    .iter()
                    .flatten()
                    .filter_map(|i| self.rule_ref(**i))
                    .collect();
                if rules.is_empty() {
                    Decision::deny(
                        DenyKind::NoGrant,
                        format!("no rule lets {vm} provide {service}"),
                        rules,
                    )
                } else {
                    Decision::deny(
                        DenyKind::DeniedByRule,
                        format!("{vm} may not provide {service}: denied"),
                        rules,
                    )
                }
            }
        }
    }

    /// May `src` connect to `service` (at `provider`, if the guest named one)? On success,
    /// the caps the connection may carry.
    pub fn check_connect(
        &self,
        src: &str,
        service: &str,
        provider: Option<&str>,
    ) -> Decision<ConnectionCaps> {
        let Some(prov) = self.providers.get(service) else {
            return Decision::deny(
                DenyKind::NoProvider,
                "no VM provides the service",
                Vec::new(),
            );
        };
        if let Some(p) = provider {
            if p != prov.vm {
                return Decision::deny(
                    DenyKind::WrongProvider,
                    format!("{service} is provided by {}, not {p}", prov.vm),
                    vec![prov.at.clone()],
                );
            }
        }
        let groups = self.groups_of(src);
        let cx = &self.connects;
        // One pass over the three levels (VM, groups, @any): denies, and the caps union and
        // grant count per level.
        let mut deny_rules: Vec<RuleRef> = Vec::new();
        let mut levels = [(FdCaps::NONE, FdCaps::NONE, 0usize); 3];
        let mut visit = |level: usize, item: &ConnectItem| match item {
            ConnectItem::Deny { at, provider } => {
                if provider.as_ref().is_none_or(|p| *p == prov.vm) {
                    deny_rules.push(at.clone());
                }
            }
            ConnectItem::Grant(g) => {
                if let Some(l) = levels.get_mut(level) {
                    l.0 = l.0.union(&g.c2s);
                    l.1 = l.1.union(&g.s2c);
                    l.2 += 1;
                }
            }
        };
        cx.at_vm(src, service).iter().for_each(|i| visit(2, i));
        cx.at_groups(groups, service).for_each(|i| visit(1, i));
        cx.at_any(src, service).iter().for_each(|i| visit(0, i));
        if !deny_rules.is_empty() {
            deny_rules.sort();
            return Decision::deny(DenyKind::DeniedByRule, "a deny rule matches", deny_rules);
        }
        // The most specific level with a grant decides the caps (union within the level).
        let Some(best) = (0..3)
            .rev()
            .find(|l| levels.get(*l).is_some_and(|x| x.2 > 0))
        else {
            return Decision::deny(DenyKind::NoGrant, "no connect grant matches", Vec::new());
        };
        let (c2s, s2c, count) =
            levels
                .get(best)
                .copied()
                .unwrap_or((FdCaps::NONE, FdCaps::NONE, 0));
        let mut rules = Vec::with_capacity(count + 1);
        rules.push(prov.at.clone());
        let mut push = |item: &ConnectItem| {
            if let ConnectItem::Grant(g) = item {
                rules.push(g.at.clone());
            }
        };
        match best {
            2 => cx.at_vm(src, service).iter().for_each(&mut push),
            1 => cx.at_groups(groups, service).for_each(&mut push),
            _ => cx.at_any(src, service).iter().for_each(&mut push),
        }
        let caps = ConnectionCaps {
            provider: prov.vm.clone(),
            c2s: c2s.intersect(&prov.c2s),
            s2c: s2c.intersect(&prov.s2c),
            max_fds: prov.max_fds,
            max_conns: prov.max_conns,
            rules: rules.clone(),
        };
        Decision {
            outcome: Ok(caps),
            rules,
        }
    }

    /// May a message on a connection with caps `conn`, going in `dir`, carry `count` fds, one
    /// of which has type `fd_type` and is sent with `requested` rights? On success, the final
    /// rights the receiver gets: `requested ∩ caps[dir][fd_type]` (TRANSFER only if the caps
    /// include it). The hub checks `requested ⊆` the sender's own rights first (its table).
    pub fn check_transfer(
        &self,
        conn: &ConnectionCaps,
        dir: Direction,
        fd_type: FdType,
        requested: Rights,
        count: u32,
    ) -> Decision<Rights> {
        let rules = conn.rules.clone();
        if count > conn.max_fds {
            return Decision::deny(
                DenyKind::TooManyFds,
                "more fds in one message than max-fds",
                rules,
            );
        }
        let invalid = requested.difference(fd_type.valid_rights());
        if !invalid.is_empty() {
            return Decision::deny(
                DenyKind::InvalidRights,
                "rights not valid for the fd type",
                rules,
            );
        }
        if fd_type == FdType::Pipe && requested.contains(Rights::READ | Rights::WRITE) {
            return Decision::deny(
                DenyKind::InvalidRights,
                "a pipe end is either a read end or a write end",
                rules,
            );
        }
        let cap = conn.caps(dir).get(fd_type);
        if cap.is_empty() {
            return Decision::deny(
                DenyKind::TypeNotAllowed,
                "fd type not in the connection's caps for this direction",
                rules,
            );
        }
        let fin = requested & cap;
        if fin.difference(Rights::TRANSFER | Rights::DUP).is_empty() {
            return Decision::deny(
                DenyKind::RightsNotAllowed,
                "no requested right survives the connection's caps",
                rules,
            );
        }
        Decision {
            outcome: Ok(fin),
            rules,
        }
    }

    /// The memfd-server quota of `vm` (0 for anything no rule sets).
    pub fn quota_for(&self, vm: &str) -> Quota {
        let groups = self.groups_of(vm);
        let levels = self.quotas.lookup(vm, groups, "");
        let mut q = Quota::default();
        type Getter = fn(&crate::ast::Action) -> Option<u64>;
        let keys: [(Getter, usize); 3] = [
            (
                |a| {
                    if let crate::ast::Action::Quota { shm, .. } = a {
                        *shm
                    } else {
                        None
                    }
                },
                0,
            ),
            (
                |a| {
                    if let crate::ast::Action::Quota { shm_count, .. } = a {
                        *shm_count
                    } else {
                        None
                    }
                },
                1,
            ),
            (
                |a| {
                    if let crate::ast::Action::Quota { vfds, .. } = a {
                        *vfds
                    } else {
                        None
                    }
                },
                2,
            ),
        ];
        for (get, k) in keys {
            'levels: for level in levels.iter().rev() {
                // Validation guarantees at most one setting per key per level for any VM.
                for idx in level {
                    if let Some(e) = self.rules.get(**idx as usize) {
                        if let Some(v) = get(&e.rule.action) {
                            let qv = QuotaValue {
                                value: v,
                                from: Some(e.at.clone()),
                            };
                            match k {
                                0 => q.shm = qv,
                                1 => q.shm_count = qv,
                                _ => q.vfds = qv,
                            }
                            break 'levels;
                        }
                    }
                }
            }
        }
        q
    }

    /// The PCI functions `vm` may own (grants minus denies), sorted by address.
    pub fn devices_for(&self, vm: &str) -> Vec<DeviceGrant> {
        self.devices_by_vm.get(vm).cloned().unwrap_or_default()
    }

    /// May `vm` own `bdf`?
    pub fn check_device(&self, vm: &str, bdf: Bdf) -> Decision<DeviceGrant> {
        match self
            .devices_by_vm
            .get(vm)
            .and_then(|v| v.iter().find(|d| d.bdf == bdf))
        {
            Some(d) => Decision {
                outcome: Ok(d.clone()),
                rules: vec![d.at.clone()],
            },
            None => Decision::deny(
                DenyKind::NoGrant,
                format!("{vm} may not own pci:{bdf}"),
                Vec::new(),
            ),
        }
    }

    /// Every device grant in the policy, by VM (after denies).
    pub fn all_devices(&self) -> Vec<(&str, &DeviceGrant)> {
        let mut v: Vec<_> = self
            .devices_by_vm
            .iter()
            .flat_map(|(vm, ds)| ds.iter().map(move |d| (vm.as_str(), d)))
            .collect();
        v.sort_by(|a, b| (a.1.bdf, a.0).cmp(&(b.1.bdf, b.0)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::Reset;
    use crate::testutil::policy;
    use proptest::prelude::*;

    const BASE: &str = "version 1
group apps browser mail term
group drivers net-vm gpu-vm usb-vm
grant net-vm device pci:0000:03:00.0 id=8086:2723
grant usb-vm device pci:0000:00:14.0 id=8086:7ae0 reset=optional
grant gpu-vm provide wayland c2s=memfd:ro,dmabuf:ro,pipe:w s2c=memfd:ro,pipe:w max-fds=8
grant clip-vm provide clipboard c2s=pipe:w s2c=pipe:w max-fds=1
grant @apps connect wayland@gpu-vm
grant @apps connect clipboard@clip-vm
grant term connect clipboard@clip-vm s2c=none
deny browser connect clipboard@clip-vm
grant @any quota shm=64MiB shm-count=256 vfds=256
grant @apps quota shm=256MiB shm-count=1024
grant gpu-vm quota shm=1GiB shm-count=4096 vfds=2048
grant host connect wayland
";

    fn kind<T>(d: &Decision<T>) -> Option<DenyKind> {
        d.outcome.as_ref().err().map(|e| e.kind)
    }

    #[test]
    fn empty_tree_denies_everything() {
        let p = policy(&[]);
        assert_eq!(
            kind(&p.check_connect("a", "wayland", None)),
            Some(DenyKind::NoProvider)
        );
        assert!(p.devices_for("a").is_empty());
        assert_eq!(p.quota_for("a"), Quota::default());
        assert!(!p.check_provide("a", "x").is_allowed());
        let d = Policy::deny_all();
        assert!(!d.check_connect("a", "b", None).is_allowed());
    }

    #[test]
    fn any_never_matches_system_vms() {
        let p = policy(&[(
            "a.policy",
            "grant p provide s c2s=pipe:w\ngrant @any connect s\ngrant @any quota vfds=9\n",
        )]);
        assert!(p.check_connect("random-vm", "s", None).is_allowed());
        assert_eq!(
            kind(&p.check_connect("hub", "s", None)),
            Some(DenyKind::NoGrant)
        );
        assert_eq!(
            kind(&p.check_connect("host", "s", None)),
            Some(DenyKind::NoGrant)
        );
        assert_eq!(p.quota_for("host").vfds.value, 0);
        assert_eq!(p.quota_for("x").vfds.value, 9);
        // Named explicitly, a system VM is matched.
        let p = policy(&[("a.policy", BASE)]);
        assert!(p.check_connect("host", "wayland", None).is_allowed());
    }

    #[test]
    fn connect_decisions_carry_rules() {
        let p = policy(&[("10-base.policy", BASE)]);
        let d = p.check_connect("browser", "wayland", None);
        let c = d.outcome.clone().unwrap();
        assert_eq!(c.provider, "gpu-vm");
        assert_eq!(c.max_fds, 8);
        assert_eq!(
            c.c2s.to_string(),
            "memfd:read+map,pipe:write,dmabuf:read+map"
        );
        let rules: Vec<String> = d.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(rules, vec!["10-base.policy:6", "10-base.policy:8"]);
        let d = p.check_connect("browser", "clipboard", Some("clip-vm"));
        assert_eq!(kind(&d), Some(DenyKind::DeniedByRule));
        assert_eq!(
            d.rules.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            vec!["10-base.policy:11"]
        );
        assert_eq!(
            kind(&p.check_connect("net-vm", "wayland", None)),
            Some(DenyKind::NoGrant)
        );
        assert_eq!(
            kind(&p.check_connect("browser", "wayland", Some("net-vm"))),
            Some(DenyKind::WrongProvider)
        );
    }

    #[test]
    fn hostile_service_names_are_just_denied() {
        let p = policy(&[("a.policy", BASE)]);
        let long = "w".repeat(10_000);
        for name in [
            long.as_str(),
            "",
            "wayland\0",
            "\0wayland",
            "wayland@gpu-vm",
            "ÿ",
        ] {
            assert!(
                !p.check_connect("browser", name, None).is_allowed(),
                "{name:?}"
            );
            assert!(
                !p.check_connect(name, "wayland", None).is_allowed(),
                "{name:?}"
            );
        }
        assert!(!p
            .check_connect("browser", "wayland", Some(&long))
            .is_allowed());
    }

    #[test]
    fn every_connect_denial_looks_the_same_to_the_guest() {
        let p = policy(&[("a.policy", BASE)]);
        for d in [
            p.check_connect("browser", "clipboard", None),
            p.check_connect("net-vm", "wayland", None),
            p.check_connect("browser", "no-such-service", None),
            p.check_connect("browser", "wayland", Some("no-such-vm")),
        ] {
            assert_eq!(
                d.outcome.unwrap_err().kind.guest_error(),
                GuestError::PermissionDenied
            );
        }
    }

    #[test]
    fn vm_specific_connect_narrows_group_grant() {
        let p = policy(&[("a.policy", BASE)]);
        let term = p.check_connect("term", "clipboard", None).outcome.unwrap();
        assert!(term.s2c.is_none());
        assert_eq!(term.c2s.to_string(), "pipe:write");
        let mail = p.check_connect("mail", "clipboard", None).outcome.unwrap();
        assert_eq!(mail.s2c.to_string(), "pipe:write");
    }

    #[test]
    fn deny_beats_grant_in_either_file_order() {
        let grant = "grant gpu-vm provide w c2s=memfd:ro\ngrant a connect w\ngroup g a\n";
        let deny = "deny a connect w\n";
        for (g, d) in [
            ("10-grant.policy", "99-deny.policy"),
            ("99-grant.policy", "10-deny.policy"),
        ] {
            let p = policy(&[(g, grant), (d, deny)]);
            assert_eq!(
                kind(&p.check_connect("a", "w", None)),
                Some(DenyKind::DeniedByRule),
                "{g} {d}"
            );
        }
        // Deny on a group covers members granted by name.
        let p = policy(&[("a.policy", grant), ("b.policy", "deny @g connect w\n")]);
        assert!(!p.check_connect("a", "w", None).is_allowed());
    }

    #[test]
    fn group_edit_changes_exactly_the_members_results() {
        let rules = "grant p provide s c2s=pipe:w\ngrant @g connect s\ngrant z quota vfds=1\n";
        let before = policy(&[("a.policy", rules), ("g.policy", "group g a b\n")]);
        let after = policy(&[("a.policy", rules), ("g.policy", "group g a c\n")]);
        for vm in ["a", "b", "c", "d", "z"] {
            let x = before.check_connect(vm, "s", None).is_allowed();
            let y = after.check_connect(vm, "s", None).is_allowed();
            let expect_change = vm == "b" || vm == "c";
            assert_eq!(x != y, expect_change, "{vm}");
        }
    }

    #[test]
    fn quota_specificity_per_key() {
        let p = policy(&[("a.policy", BASE)]);
        let q = p.quota_for("gpu-vm");
        assert_eq!(
            (q.shm.value, q.shm_count.value, q.vfds.value),
            (1 << 30, 4096, 2048)
        );
        let q = p.quota_for("browser");
        // shm from @apps, vfds falls through to @any.
        assert_eq!(
            (q.shm.value, q.shm_count.value, q.vfds.value),
            (256 << 20, 1024, 256)
        );
        assert_eq!(q.vfds.from.unwrap().line, 12);
        let q = p.quota_for("stranger");
        assert_eq!(q.shm.value, 64 << 20);
    }

    #[test]
    fn devices_respect_denies() {
        let p = policy(&[("a.policy", BASE)]);
        let d = p.devices_for("usb-vm");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].reset, Reset::Optional);
        assert!(p.check_device("net-vm", d[0].bdf).outcome.is_err());
        let p = policy(&[
            ("a.policy", BASE),
            ("b.policy", "deny @drivers device pci:0000:03:00.0\n"),
        ]);
        assert!(p.devices_for("net-vm").is_empty());
    }

    #[test]
    fn transfer_checks() {
        let p = policy(&[("a.policy", BASE)]);
        let c = p.check_connect("browser", "wayland", None).outcome.unwrap();
        // Reduced to the contract; TRANSFER dropped because the contract lacks it.
        let d = p.check_transfer(
            &c,
            Direction::C2s,
            FdType::Memfd,
            Rights::READ | Rights::WRITE | Rights::MAP | Rights::TRANSFER,
            1,
        );
        assert_eq!(d.outcome, Ok(Rights::READ | Rights::MAP));
        assert_eq!(
            kind(&p.check_transfer(&c, Direction::S2c, FdType::Dmabuf, Rights::READ, 1)),
            Some(DenyKind::TypeNotAllowed)
        );
        assert_eq!(
            kind(&p.check_transfer(&c, Direction::C2s, FdType::Memfd, Rights::READ, 9)),
            Some(DenyKind::TooManyFds)
        );
        assert_eq!(
            kind(&p.check_transfer(&c, Direction::C2s, FdType::Pipe, Rights::MAP, 1)),
            Some(DenyKind::InvalidRights)
        );
        assert_eq!(
            kind(&p.check_transfer(
                &c,
                Direction::C2s,
                FdType::Pipe,
                Rights::READ | Rights::WRITE,
                1
            )),
            Some(DenyKind::InvalidRights)
        );
        // A pipe read end where the contract only carries write ends.
        assert_eq!(
            kind(&p.check_transfer(&c, Direction::C2s, FdType::Pipe, Rights::READ, 1)),
            Some(DenyKind::RightsNotAllowed)
        );
        assert_eq!(
            p.check_transfer(&c, Direction::C2s, FdType::Pipe, Rights::READ, 1)
                .outcome
                .unwrap_err()
                .kind
                .guest_error(),
            GuestError::PermissionDenied
        );
        // TRANSFER survives only if the contract grants it.
        let p = policy(&[(
            "a.policy",
            "grant p provide s c2s=memfd:read+transfer\ngrant a connect s\n",
        )]);
        let c = p.check_connect("a", "s", None).outcome.unwrap();
        assert_eq!(
            p.check_transfer(
                &c,
                Direction::C2s,
                FdType::Memfd,
                Rights::READ | Rights::TRANSFER,
                1
            )
            .outcome,
            Ok(Rights::READ | Rights::TRANSFER)
        );
    }

    fn rights_strategy() -> impl Strategy<Value = Rights> {
        (0u32..(1 << 12)).prop_map(Rights::from_bits_truncate)
    }

    proptest! {
        /// P2: what a receiver gets never exceeds the request, the contract or the narrowing.
        #[test]
        fn transfer_is_monotonic(contract in rights_strategy(), narrow in rights_strategy(), req in rights_strategy(), ty in 0usize..5) {
            let t = FdType::ALL[ty];
            let contract = contract & t.grantable_rights();
            let narrow = narrow & contract;
            let mut cc = FdCaps::NONE;
            cc.set(t, contract);
            let mut nc = FdCaps::NONE;
            nc.set(t, narrow);
            let text = format!("grant p provide s c2s={cc}\ngrant a connect s c2s={nc}\n");
            let p = policy(&[("a.policy", &text)]);
            let c = p.check_connect("a", "s", None).outcome.unwrap();
            if let Ok(fin) = p.check_transfer(&c, Direction::C2s, t, req, 1).outcome {
                prop_assert!(fin.is_subset_of(req));
                prop_assert!(fin.is_subset_of(narrow));
                prop_assert!(fin.is_subset_of(t.grantable_rights()));
            }
        }
    }

    /// Lines for the shuffle property: valid in any order and any split into files.
    const SHUFFLE_LINES: &[&str] = &[
        "version 1",
        "group apps browser mail term",
        "group drivers net-vm gpu-vm",
        "group apps2 mail",
        "grant net-vm device pci:0000:03:00.0 id=8086:2723",
        "grant gpu-vm device pci:0000:00:02.0 id=any reset=optional",
        "deny @drivers device pci:0000:00:02.0",
        "grant gpu-vm provide wayland c2s=memfd:ro,dmabuf:ro,pipe:w s2c=memfd:ro,pipe:w max-fds=8",
        "grant clip-vm provide clipboard c2s=pipe:w s2c=pipe:w max-fds=1",
        "grant net-vm provide net c2s=socket:send+recv s2c=socket:send+recv",
        "grant @apps connect wayland@gpu-vm",
        "grant @apps connect clipboard@clip-vm",
        "grant @apps2 connect clipboard c2s=none",
        "grant term connect clipboard@clip-vm s2c=none",
        "deny browser connect clipboard@clip-vm",
        "grant @any connect net",
        "deny @drivers connect net",
        "grant @any quota shm=64MiB shm-count=256 vfds=256",
        "grant @apps quota shm=256MiB shm-count=1024",
        "grant gpu-vm quota shm=1GiB shm-count=4096 vfds=2048",
        "grant mail quota vfds=7",
    ];

    /// Every decision, without provenance (line numbers move when lines move).
    fn decisions(p: &Policy) -> Vec<String> {
        let mut out = Vec::new();
        for vm in [
            "browser", "mail", "term", "net-vm", "gpu-vm", "clip-vm", "stranger", "host",
        ] {
            for svc in ["wayland", "clipboard", "net", "none"] {
                let d = p.check_connect(vm, svc, None);
                out.push(format!(
                    "{vm} {svc} {:?}",
                    d.outcome
                        .as_ref()
                        .map(|c| (c.c2s, c.s2c, c.max_fds, c.provider.clone()))
                        .map_err(|e| e.kind)
                ));
                if let Ok(c) = &d.outcome {
                    for t in FdType::ALL {
                        for dir in [Direction::C2s, Direction::S2c] {
                            let r = p.check_transfer(
                                c,
                                dir,
                                t,
                                Rights::READ | Rights::MAP | Rights::SEND,
                                1,
                            );
                            out.push(format!("  {t} {dir} {:?}", r.outcome.map_err(|e| e.kind)));
                        }
                    }
                }
            }
            let q = p.quota_for(vm);
            out.push(format!(
                "{vm} quota {} {} {}",
                q.shm.value, q.shm_count.value, q.vfds.value
            ));
            out.push(format!(
                "{vm} devices {:?}",
                p.devices_for(vm)
                    .iter()
                    .map(|d| (d.bdf, d.id, d.reset))
                    .collect::<Vec<_>>()
            ));
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// P4: shuffling lines and splitting them over files gives identical decisions.
        #[test]
        fn shuffled_files_and_lines_decide_identically(
            order in Just((0..SHUFFLE_LINES.len()).collect::<Vec<_>>()).prop_shuffle(),
            split in proptest::collection::vec(0usize..4, SHUFFLE_LINES.len()),
            names in Just(vec!["10-a.policy", "20-b.policy", "50-c.policy", "99-z.policy"]).prop_shuffle(),
        ) {
            let reference = decisions(&policy(&[("all.policy", &SHUFFLE_LINES.join("\n"))]));
            let mut files = vec![String::new(); 4];
            for i in order {
                let f = split[i];
                if SHUFFLE_LINES[i].starts_with("version") {
                    // `version` may appear once per file: give it to every file.
                    continue;
                }
                files[f].push_str(SHUFFLE_LINES[i]);
                files[f].push('\n');
            }
            let named: Vec<(&str, &str)> = names.iter().zip(&files).map(|(n, t)| (*n, t.as_str())).collect();
            prop_assert_eq!(decisions(&policy(&named)), reference);
        }
    }
}
