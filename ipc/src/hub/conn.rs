//! Connections: the two hub-side ends of each client ⇄ provider connection (`end.rs`),
//! connect and close (with the faux accept), a half-closed connection's finish, and a
//! connection's standing under a policy generation.

use std::os::fd::AsFd;
use std::sync::Arc;

use bulkhead_policy::{ConnectionCaps, Direction};

use crate::channel::Channel;
use crate::classify::ObjKey;

use super::audit::Entry;
use super::end::End;
use super::handles::VmIdx;
use super::protocol::{ConnId, HubEvent, Name, Refusal};
use super::{reload, Hub};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    Client,
    Provider,
}

/// A connection's standing under one generation.
#[derive(Clone)]
pub(super) struct ConnDecision {
    pub(super) generation: u64,
    /// `None`: the generation no longer allows the connection.
    pub(super) caps: Option<Arc<ConnectionCaps>>,
    /// `vfds` quotas of the client and the provider.
    pub(super) vfds: [u64; 2],
}

pub(super) struct Conn {
    pub(super) service: String,
    pub(super) client: End,
    pub(super) provider: End,
    /// Identities of the connection's two VMM-side socket ends (client's, provider's): a
    /// frame carrying either is refused (`v ≠ c`, policy.md's transfer check step 1).
    pub(super) vmm_ends: [ObjKey; 2],
    /// Decided under one generation (cached until the next apply).
    pub(super) caps: Option<ConnDecision>,
    pub(super) allowed_frames: u32,
}

impl Conn {
    pub(super) fn end(&self, s: Side) -> &End {
        match s {
            Side::Client => &self.client,
            Side::Provider => &self.provider,
        }
    }
    pub(super) fn end_mut(&mut self, s: Side) -> &mut End {
        match s {
            Side::Client => &mut self.client,
            Side::Provider => &mut self.provider,
        }
    }
}

pub(super) fn other(s: Side) -> Side {
    match s {
        Side::Client => Side::Provider,
        Side::Provider => Side::Client,
    }
}

pub(super) fn dir_from(s: Side) -> Direction {
    match s {
        Side::Client => Direction::C2s,
        Side::Provider => Direction::S2c,
    }
}

impl Hub {
    pub(super) fn connect(&mut self, vm: VmIdx, tag: u32, service: &str, provider: Option<&str>) {
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let d = gen.policy.check_connect(&name, service, provider);
        let mut rules: Vec<String> = d.rules.iter().map(|r| r.to_string()).collect();
        let obj = format!("{service}@{}", provider.unwrap_or("*"));
        let mut refusal = Refusal::PermissionDenied;
        let result = match d.outcome {
            Err(den) => Err(format!("{:?}: {}", den.kind, den.reason)),
            Ok(_) if self.conns_of(vm) >= self.budgets.conns => Err(format!(
                "{name} has {} connections open (the hub's per-VM limit)",
                self.budgets.conns
            )),
            Ok(caps) => match self.registry.provider_of(service) {
                Some(p) if self.vm_name(p) == caps.provider => {
                    let live = self.conns.values().filter(|c| c.service == service).count();
                    match caps.max_conns {
                        Some(max) if u64::try_from(live).unwrap_or(u64::MAX) >= u64::from(max) => {
                            Err(format!("max-conns {max} reached for {service}"))
                        }
                        _ if !self.events_room(p) => {
                            // The provider is not reading its channel: its Accept could not
                            // be queued. The client may try again; nothing was made.
                            refusal = Refusal::Busy;
                            Err(format!(
                                "{} is not reading its channel ({} events queued)",
                                caps.provider, self.budgets.events
                            ))
                        }
                        _ => Ok((p, caps)),
                    }
                }
                _ => Err(format!(
                    "{service}: provider {} is not running or has not registered",
                    caps.provider
                )),
            },
        };
        let (prov, caps) = match result {
            Ok(x) => x,
            Err(reason) => {
                self.audit.record(Entry {
                    generation: gen.number,
                    rules,
                    src: name,
                    verb: "connect",
                    obj,
                    allowed: false,
                    reason: Some(reason),
                    ..Entry::default()
                });
                self.refuse_vm(vm, tag, refusal);
                return;
            }
        };
        let pairs = Channel::pair().and_then(|a| Channel::pair().map(|b| (a, b)));
        let ((client_vmm, client_hub), (prov_vmm, prov_hub)) = match pairs {
            Ok(p) => p,
            Err(e) => {
                log::error!("connect {obj}: socketpair: {e}");
                self.refuse_vm(vm, tag, Refusal::Busy);
                return;
            }
        };
        for ch in [&client_hub, &prov_hub] {
            if let Err(e) = ch.set_nonblocking(true) {
                log::warn!("connect {obj}: {e}");
            }
        }
        let key_of = |ch: &Channel| ObjKey::of(ch.as_fd());
        let vmm_ends = match (key_of(&client_vmm), key_of(&prov_vmm)) {
            (Ok(c), Ok(p)) => [c, p],
            (Err(e), _) | (_, Err(e)) => {
                log::error!("connect {obj}: fstat of a new socket: {e}");
                self.refuse_vm(vm, tag, Refusal::Busy);
                return;
            }
        };
        let id = self.new_conn_id();
        rules.sort();
        rules.dedup();
        self.audit.record(Entry {
            generation: gen.number,
            rules,
            src: name,
            verb: "connect",
            obj: format!("{service}@{}", caps.provider),
            fds: vec![format!("c2s={}", caps.c2s), format!("s2c={}", caps.s2c)],
            allowed: true,
            ..Entry::default()
        });
        for key in vmm_ends {
            self.hub_ends.insert(key, id);
        }
        self.conns.insert(
            id,
            Conn {
                service: service.to_string(),
                client: End::new(vm, client_hub),
                provider: End::new(prov, prov_hub),
                vmm_ends,
                caps: None,
                allowed_frames: 0,
            },
        );
        let svc: Name = truncate_name(service);
        let sock_name: Name = truncate_name(&format!("wl-conn-{id}"));
        self.send_vm(
            prov,
            &HubEvent::Accept {
                service: svc,
                conn: id,
                name: sock_name,
            },
            vec![prov_vmm.into_fd()],
        );
        self.send_vm(
            vm,
            &HubEvent::Connected { tag, conn: id },
            vec![client_vmm.into_fd()],
        );
    }

    /// A fresh connection id (never 0, never one in use).
    pub(super) fn new_conn_id(&mut self) -> ConnId {
        loop {
            let id = self.next_conn;
            self.next_conn = self.next_conn.wrapping_add(1).max(1);
            if !self.conns.contains_key(&id) && !self.meds.contains_key(&id) {
                return id;
            }
        }
    }

    /// Connections `vm` opened as a client, and sockets mediated for it.
    pub(super) fn conns_of(&self, vm: VmIdx) -> usize {
        self.conns.values().filter(|c| c.client.vm == vm).count()
            + self.meds.values().filter(|m| m.end.vm == vm).count()
    }

    /// Takes what `end` held off its VM's budgets (the end is going away).
    pub(super) fn discharge_end(&mut self, end: &End) {
        let (fds, bytes) = end.held();
        if let Some(slot) = self.vms.get_mut(end.vm) {
            slot.usage.release(fds, bytes);
            slot.usage.inflight = slot.usage.inflight.saturating_sub(end.inflight);
        }
    }

    pub(super) fn close_conn(&mut self, id: ConnId, tag: u32) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        for key in c.vmm_ends {
            self.hub_ends.remove(&key);
        }
        if c.allowed_frames > 0 {
            let generation = self.store.current().number;
            self.audit.record(Entry {
                generation,
                src: self.vm_name(c.client.vm),
                verb: "transfer",
                obj: format!(
                    "{}@{} conn {id} (allowed frames, summary)",
                    c.service,
                    self.vm_name(c.provider.vm)
                ),
                allowed: true,
                similar: c.allowed_frames,
                ..Entry::default()
            });
        }
        self.discharge_end(&c.client);
        self.discharge_end(&c.provider);
        let (a, b) = (c.client.vm, c.provider.vm);
        drop(c);
        if tag != 0 {
            self.send_vm(a, &HubEvent::Closed { tag, conn: id }, Vec::new());
        } else {
            self.notify_closed(a, id);
        }
        if b != a {
            self.notify_closed(b, id);
        }
    }

    /// Closes a connection one side of which sent EOF, once everything queued toward the
    /// other side is delivered (a sender's last frames are not lost).
    pub(super) fn finish_if_drained(&mut self, id: ConnId) {
        let done = self.conns.get(&id).is_some_and(|c| {
            (c.client.eof && c.provider.out.is_empty())
                || (c.provider.eof && c.client.out.is_empty())
        });
        if done {
            self.close_conn(id, 0);
        }
    }

    /// The standing of `id` under generation `gen`: the cached one if it is of `gen`, else
    /// computed (and not cached: [`Hub::conn_decision`] caches).
    pub(super) fn standing(&self, id: ConnId, gen: &reload::Generation) -> Option<ConnDecision> {
        let c = self.conns.get(&id)?;
        if let Some(d) = &c.caps {
            if d.generation == gen.number {
                return Some(d.clone());
            }
        }
        Some(self.standing_of(c.client.vm, &c.service, c.provider.vm, gen))
    }

    /// The standing of a connection of `client` to `service` at `provider` under `gen`.
    pub(super) fn standing_of(
        &self,
        client: VmIdx,
        service: &str,
        provider: VmIdx,
        gen: &reload::Generation,
    ) -> ConnDecision {
        let client = self.vm_name(client);
        let provider = self.vm_name(provider);
        let caps = gen
            .policy
            .check_connect(&client, service, Some(&provider))
            .outcome
            .ok()
            .map(Arc::new);
        ConnDecision {
            generation: gen.number,
            caps,
            vfds: [
                gen.policy.quota_for(&client).vfds.value,
                gen.policy.quota_for(&provider).vfds.value,
            ],
        }
    }

    /// The standing of `id` under generation `gen`, cached per generation.
    pub(super) fn conn_decision(
        &mut self,
        id: ConnId,
        gen: &reload::Generation,
    ) -> Option<ConnDecision> {
        let d = self.standing(id, gen)?;
        if let Some(c) = self.conns.get_mut(&id) {
            c.caps = Some(d.clone());
        }
        Some(d)
    }

    /// Caps of `id` under generation `gen`.
    pub(super) fn conn_caps(
        &mut self,
        id: ConnId,
        gen: &reload::Generation,
    ) -> Option<Arc<ConnectionCaps>> {
        self.conn_decision(id, gen).and_then(|d| d.caps)
    }
}

pub(super) fn truncate_name(s: &str) -> Name {
    let mut n = Name::new();
    for ch in s.chars() {
        if n.push(ch).is_err() {
            break;
        }
    }
    n
}
