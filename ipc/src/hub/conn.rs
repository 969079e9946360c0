//! Connections: the two hub-side sockets of each client ⇄ provider connection, connect and
//! close, reading a side in `recvmmsg` batches (bounded by the queues: back-pressure), the
//! per-side outbound queues, and the connection's standing under a policy generation.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::Arc;

use bulkhead_policy::{ConnectionCaps, Direction};

use crate::channel::{Channel, ChannelError};
use crate::classify::ObjKey;
use crate::frame;

use super::audit::Entry;
use super::handles::VmIdx;
use super::protocol::{ConnEvent, ConnId, HubEvent, Name, Refusal};
use super::queue::{flush, OutFd, Queued};
use super::{reload, Hub, READ_BUDGET};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    Client,
    Provider,
}

pub(super) struct End {
    pub(super) vm: VmIdx,
    pub(super) sock: Channel,
    /// Frames for this end's VMM not yet sent.
    pub(super) out: VecDeque<Queued>,
    /// The VMM hung up while back-pressure kept the hub from reading the rest: leave the
    /// socket out of the poll set (POLLHUP would spin) until reading resumes.
    pub(super) hung_up: bool,
    /// The hub read EOF from this end: nothing more comes; the connection closes once the
    /// frames queued toward the other end are delivered.
    pub(super) eof: bool,
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
        let result = match d.outcome {
            Err(den) => Err(format!("{:?}: {}", den.kind, den.reason)),
            Ok(_)
                if self.conns.values().filter(|c| c.client.vm == vm).count()
                    >= self.max_conns_per_vm =>
            {
                Err(format!(
                    "{name} has {} connections open (the hub's per-VM limit)",
                    self.max_conns_per_vm
                ))
            }
            Ok(caps) => match self.registry.provider_of(service) {
                Some(p) if self.vm_name(p) == caps.provider => {
                    let live = self.conns.values().filter(|c| c.service == service).count();
                    match caps.max_conns {
                        Some(max) if u64::try_from(live).unwrap_or(u64::MAX) >= u64::from(max) => {
                            Err(format!("max-conns {max} reached for {service}"))
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
                self.refuse_vm(vm, tag, Refusal::PermissionDenied);
                return;
            }
        };
        let pairs = Channel::pair().and_then(|a| Channel::pair().map(|b| (a, b)));
        let ((client_vmm, client_hub), (prov_vmm, prov_hub)) = match pairs {
            Ok(p) => p,
            Err(e) => {
                log::error!("connect {obj}: socketpair: {e}");
                self.refuse_vm(vm, tag, Refusal::OutOfMemory);
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
                self.refuse_vm(vm, tag, Refusal::OutOfMemory);
                return;
            }
        };
        let id = self.next_conn;
        self.next_conn = self.next_conn.wrapping_add(1).max(1);
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
        self.conns.insert(
            id,
            Conn {
                service: service.to_string(),
                client: End {
                    vm,
                    sock: client_hub,
                    out: VecDeque::new(),
                    hung_up: false,
                    eof: false,
                },
                provider: End {
                    vm: prov,
                    sock: prov_hub,
                    out: VecDeque::new(),
                    hung_up: false,
                    eof: false,
                },
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

    pub(super) fn close_conn(&mut self, id: ConnId, tag: u32) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
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
        let (a, b) = (c.client.vm, c.provider.vm);
        drop(c);
        self.send_vm(a, &HubEvent::Closed { tag, conn: id }, Vec::new());
        if b != a {
            self.send_vm(b, &HubEvent::Closed { tag: 0, conn: id }, Vec::new());
        }
    }

    /// Reads a batch from one side; deliveries are flushed once after the batch (with
    /// `sendmmsg`), so both VMMs see bursts rather than one wake-up per frame.
    pub(super) fn read_conn(&mut self, id: ConnId, s: Side) {
        self.defer_flush = true;
        self.read_conn_batch(id, s);
        self.defer_flush = false;
        self.bury(); // on every path out of the read, before the deliveries go out
        self.flush_conn(id, other(s));
        self.flush_conn(id, s);
        self.finish_if_drained(id);
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

    /// Reads frames from one side with `recvmmsg` batches until the socket is empty, the
    /// queues are full (back-pressure: the rest stays in the sender's socket) or
    /// `READ_BUDGET` frames were read. Each frame is still decided on its own (`route`);
    /// after each batch the senders' fds it consumed are closed, and `read_conn` then
    /// sends everything queued with `sendmmsg`.
    pub(super) fn read_conn_batch(&mut self, id: ConnId, s: Side) {
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let limit = self.queue_limit;
            let Some(c) = self.conns.get(&id) else {
                return;
            };
            if c.end(s).eof {
                return;
            }
            let queued = c.end(other(s)).out.len().max(c.end(s).out.len());
            // Never read more than the queues can take: every frame read may queue one
            // delivery (or one refusal), and the bound stays exact.
            let room = limit.saturating_sub(queued).min(budget);
            if room == 0 {
                return; // back-pressure: leave it in the sender's socket
            }
            let mut got = std::mem::take(&mut self.rx_out);
            got.clear();
            let res = c.end(s).sock.try_recv_frames(&mut self.rx, room, &mut got);
            let asked = room.min(crate::channel::RECV_BATCH);
            match res {
                Ok(()) => {}
                Err(ChannelError::WouldBlock) => {
                    self.rx_out = got;
                    return;
                }
                Err(_) => {
                    // Closed, or the socket failed: nothing more comes from this side.
                    self.rx_out = got;
                    self.end_eof(id, s);
                    return;
                }
            }
            let n = got.len();
            budget = budget.saturating_sub(n.max(1));
            let mut eof = false;
            for outcome in got.drain(..) {
                match outcome {
                    Ok(raw) => self.route(id, s, raw.bytes, raw.fds),
                    Err(ChannelError::Closed) | Err(ChannelError::Sys { .. }) => {
                        eof = true;
                        break;
                    }
                    Err(e) => {
                        // Truncated / empty / oversize: consumed, fds closed. Refuse it.
                        self.deny_frame(
                            id,
                            s,
                            0,
                            Refusal::InvalidArgs,
                            e.to_string(),
                            Vec::new(),
                            Vec::new(),
                        );
                    }
                }
            }
            self.rx_out = got;
            if eof {
                self.end_eof(id, s);
                return;
            }
            // The senders' fds this batch replaced close now; the deliveries (and refusals)
            // go out once the read is over (`read_conn`): one burst of up to the queue
            // limit wakes the receiver once, where a flush per batch let it wake (and
            // preempt the hub on a busy machine) twice as often, for more CPU per frame on
            // both sides (measured, docs/ipc.md §7).
            self.bury();
            if n < asked {
                return; // the socket was empty: no need for a call that says EAGAIN
            }
        }
    }

    /// The hub read EOF (or an error) from one side: nothing more comes from it.
    pub(super) fn end_eof(&mut self, id: ConnId, s: Side) {
        if let Some(c) = self.conns.get_mut(&id) {
            let me = c.end_mut(s);
            me.eof = true;
            me.out.clear(); // refusals for a sender that left
        }
    }

    pub(super) fn flush_conn(&mut self, id: ConnId, s: Side) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let end = c.end_mut(s);
        if let Err(e) = flush(&end.sock, &mut end.out) {
            log::debug!("conn {id}: {e}; closing");
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
        let client = self.vm_name(c.client.vm);
        let provider = self.vm_name(c.provider.vm);
        let caps = gen
            .policy
            .check_connect(&client, &c.service, Some(&provider))
            .outcome
            .ok()
            .map(Arc::new);
        Some(ConnDecision {
            generation: gen.number,
            caps,
            vfds: [
                gen.policy.quota_for(&client).vfds.value,
                gen.policy.quota_for(&provider).vfds.value,
            ],
        })
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

    pub(super) fn queue_conn(&mut self, id: ConnId, s: Side, ev: &ConnEvent, fds: Vec<OutFd>) {
        let bytes = match frame::encode(ev) {
            Ok(b) => b,
            Err(e) => {
                log::error!("conn {id}: cannot encode an event: {e}");
                return;
            }
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.end_mut(s).out.push_back((bytes, fds));
        }
        if !self.defer_flush {
            self.flush_conn(id, s);
        }
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
