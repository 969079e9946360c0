//! One send on a connection: its parts put together ([`Hub::frame`]), then a pure
//! [`Hub::decide`] under one policy generation, then [`Hub::commit`] (kernel-level
//! attenuation, sockets made into mediated connections, the handle table, the delivery,
//! the `Accepted` verdict) or [`Hub::deny`] (one `Refused` verdict, one audit record, every
//! fd closed). A send is delivered whole or not at all: its deliveries are queued together,
//! after its last part arrived and the whole was decided.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bulkhead_policy::{ConnectionCaps, Rights};

use crate::classify::{classify, FdKind};
use crate::frame::{self, MAX_FDS};

use super::audit::Entry;
use super::conn::{dir_from, other, ConnDecision, Side};
use super::end::{At, Partial};
use super::protocol::{ConnEvent, ConnId, ConnSend, FdInfo, Refusal, MAX_SEND, PART_DATA};
use super::queue::OutFd;
use super::router::{self, Approved, FdIn, Hop};
use super::Hub;

/// A whole send, its parts put together.
pub(super) struct Msg {
    /// The seq of its last part (named in the verdict).
    pub(super) seq: u32,
    pub(super) data: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) rights: heapless::Vec<Rights, MAX_FDS>,
}

/// What [`Hub::decide`] found.
pub(super) struct Decision {
    /// The connection's standing under the deciding generation, if it was not cached yet.
    pub(super) standing: Option<ConnDecision>,
    /// Deliver as planned, or refuse.
    pub(super) verdict: Result<Plan, Denial>,
}

/// An approved send, ready to commit.
pub(super) struct Plan {
    pub(super) caps: Arc<ConnectionCaps>,
    pub(super) receiver_vfds: u64,
    pub(super) sender_vfds: u64,
    pub(super) approved: Vec<Approved>,
    /// For each fd: whether it is a socket to mediate (and whether it is a stream).
    pub(super) sockets: Vec<Option<bool>>,
}

/// A refused send: the uniform answer for the sender and the detail for the audit log.
pub(super) struct Denial {
    pub(super) refusal: Refusal,
    pub(super) reason: String,
    pub(super) rules: Vec<String>,
    pub(super) fds: Vec<String>,
}

impl Denial {
    pub(super) fn new(refusal: Refusal, reason: String) -> Denial {
        Denial {
            refusal,
            reason,
            rules: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// How many deliveries `len` bytes make (at least one).
pub(super) fn parts_of(len: usize) -> usize {
    len.div_ceil(PART_DATA).max(1)
}

impl Hub {
    /// One datagram from `at`: a whole send, or one part of a longer one (held until its
    /// last part). Part 0 always starts a new send: an unfinished one before it was given
    /// up by its VMM and is dropped.
    pub(super) fn frame(&mut self, at: At, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        let msg: ConnSend = match frame::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return self.refuse(
                    at,
                    0,
                    Denial::new(Refusal::InvalidArgs, format!("bad frame: {e}")),
                )
            }
        };
        let mismatch = (msg.rights.len() != fds.len()).then(|| {
            format!(
                "{} fds attached, {} rights given",
                fds.len(),
                msg.rights.len()
            )
        });
        if msg.part == 0 {
            self.drop_partial(at);
            if !msg.more {
                if let Some(reason) = mismatch {
                    return self.refuse(at, msg.seq, Denial::new(Refusal::InvalidArgs, reason));
                }
                let m = Msg {
                    seq: msg.seq,
                    data: msg.data,
                    fds,
                    rights: msg.rights,
                };
                return self.route_msg(at, m);
            }
            let p = Partial {
                last_seq: msg.seq,
                next_part: 1,
                data: Vec::new(),
                fds: Vec::new(),
                rights: msg.rights,
                poisoned: None,
            };
            if let Some(e) = self.end_mut(at) {
                e.partial = Some(p);
            }
            match mismatch {
                Some(reason) => self.poison(at, Refusal::InvalidArgs, reason),
                None => self.add_part(at, msg.data, fds),
            }
            return;
        }
        let Some(p) = self.end_mut(at).and_then(|e| e.partial.as_mut()) else {
            let reason = format!("part {} of a send that was not started", msg.part);
            return self.refuse(at, msg.seq, Denial::new(Refusal::InvalidArgs, reason));
        };
        let problem = if p.poisoned.is_some() {
            None
        } else if msg.part != p.next_part {
            Some(format!("part {} where {} was due", msg.part, p.next_part))
        } else if !fds.is_empty() || mismatch.is_some() {
            Some(format!(
                "fds with part {} (only part 0 carries fds)",
                msg.part
            ))
        } else if p.data.len().saturating_add(msg.data.len()) > MAX_SEND {
            Some(format!("a send of more than {MAX_SEND} bytes"))
        } else {
            None
        };
        p.next_part = msg.part.wrapping_add(1);
        p.last_seq = msg.seq;
        match problem {
            Some(reason) => self.poison(at, Refusal::InvalidArgs, reason),
            None => self.add_part(at, msg.data, fds),
        }
        if !msg.more {
            self.finish_partial(at);
        }
    }

    /// Adds one part's data (and part 0's fds) to the send in progress at `at`, charged to
    /// its VM; past the VM's budget the send is refused `Busy` (when it ends).
    fn add_part(&mut self, at: At, data: Vec<u8>, fds: Vec<OwnedFd>) {
        let budgets = self.budgets;
        let Some(e) = self.end_mut(at) else {
            return;
        };
        let vm = e.vm;
        let Some(p) = e.partial.as_mut() else {
            return;
        };
        if p.poisoned.is_some() {
            return;
        }
        let (n, len) = (fds.len(), data.len());
        p.data.extend_from_slice(&data);
        p.fds.extend(fds);
        let over = self.vms.get_mut(vm).is_some_and(|slot| {
            let over = slot.usage.over(&budgets, n, len);
            slot.usage.hold(n, len);
            over
        });
        if over {
            self.poison(
                at,
                Refusal::Busy,
                "the sender's budget for unfinished sends is spent".into(),
            );
        }
    }

    /// Marks the send in progress at `at` refused; what it held goes now.
    fn poison(&mut self, at: At, refusal: Refusal, reason: String) {
        let Some(e) = self.end_mut(at) else {
            return;
        };
        let vm = e.vm;
        let Some(p) = e.partial.as_mut() else {
            return;
        };
        if p.poisoned.is_some() {
            return;
        }
        let (n, len) = (p.fds.len(), p.data.len());
        p.poisoned = Some((refusal, reason));
        p.data = Vec::new();
        p.fds.clear();
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.usage.release(n, len);
        }
    }

    /// Drops an unfinished send at `at` (its VMM gave up on it: no verdict).
    fn drop_partial(&mut self, at: At) {
        let Some(e) = self.end_mut(at) else {
            return;
        };
        let vm = e.vm;
        if let Some(p) = e.partial.take() {
            log::debug!("conn {}: an unfinished send was dropped", at.id());
            if let Some(slot) = self.vms.get_mut(vm) {
                slot.usage.release(p.fds.len(), p.data.len());
            }
        }
    }

    /// The last part of a send arrived: decide on the whole.
    fn finish_partial(&mut self, at: At) {
        let Some(e) = self.end_mut(at) else {
            return;
        };
        let vm = e.vm;
        let Some(p) = e.partial.take() else {
            return;
        };
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.usage.release(p.fds.len(), p.data.len());
        }
        if let Some((refusal, reason)) = p.poisoned {
            return self.refuse(at, p.last_seq, Denial::new(refusal, reason));
        }
        let m = Msg {
            seq: p.last_seq,
            data: p.data,
            fds: p.fds,
            rights: p.rights,
        };
        self.route_msg(at, m);
    }

    /// A whole send from `at`.
    fn route_msg(&mut self, at: At, m: Msg) {
        match at {
            At::Conn(id, s) => {
                let d = self.decide(id, s, &m);
                if let Some(standing) = d.standing {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.caps = Some(standing);
                    }
                }
                match d.verdict {
                    Ok(plan) => self.commit(id, s, plan, m),
                    Err(denial) => {
                        let seq = m.seq;
                        drop(m);
                        self.refuse(at, seq, denial);
                    }
                }
            }
            At::Med(id) => self.route_med(id, m),
        }
    }

    /// The decision on one send over a connection, under one policy generation. Pure: it
    /// reads the hub's state and changes nothing (a connection's standing under a new
    /// generation is returned for the caller to cache).
    pub(super) fn decide(&self, id: ConnId, s: Side, m: &Msg) -> Decision {
        let mut d = Decision {
            standing: None,
            verdict: Err(Denial::new(Refusal::InvalidId, "no connection".into())),
        };
        // One generation for the whole decision.
        let gen = self.store.current();
        let Some(standing) = self.standing(id, &gen) else {
            return d;
        };
        let Some(c) = self.conns.get(&id) else {
            return d;
        };
        if c.caps
            .as_ref()
            .is_none_or(|cached| cached.generation != standing.generation)
        {
            d.standing = Some(standing.clone());
        }
        let Some(caps) = standing.caps.clone() else {
            let reason = format!("generation {} no longer allows this connection", gen.number);
            d.verdict = Err(Denial::new(Refusal::PermissionDenied, reason));
            return d;
        };
        let (sender, receiver) = (c.end(s).vm, c.end(other(s)).vm);
        let [client_vfds, provider_vfds] = standing.vfds;
        let (sender_vfds, receiver_vfds) = match s {
            Side::Client => (client_vfds, provider_vfds),
            Side::Provider => (provider_vfds, client_vfds),
        };
        let ins: Vec<FdIn> = m
            .fds
            .iter()
            .zip(m.rights.iter())
            .map(|(fd, r)| FdIn {
                class: classify(fd.as_fd()),
                requested: *r,
            })
            .collect();
        let hop = Hop {
            caps: &caps,
            dir: dir_from(s),
            sender,
            receiver,
            receiver_vfds,
            sender_vfds,
            conn_ends: &c.vmm_ends,
            hub_ends: &self.hub_ends,
        };
        let approved = match router::check_frame(&gen.policy, hop, &self.handles, &ins) {
            Ok(a) => a,
            Err(rej) => {
                d.verdict = Err(Denial {
                    refusal: rej.refusal,
                    reason: rej.reason,
                    rules: rej.rules,
                    fds: describe(&ins),
                });
                return d;
            }
        };
        // Sockets become mediated connections, if they can be.
        let mut sockets = Vec::with_capacity(m.fds.len());
        for (i, (a, fd)) in approved.iter().zip(&m.fds).enumerate() {
            if a.class.kind != FdKind::Socket {
                sockets.push(None);
                continue;
            }
            match self.vet_socket(fd.as_fd()) {
                Ok(stream) => sockets.push(Some(stream)),
                Err(why) => {
                    let mut den = Denial::new(Refusal::PermissionDenied, format!("fd {i}: {why}"));
                    den.fds = describe(&ins);
                    d.verdict = Err(den);
                    return d;
                }
            }
        }
        // Budgets: the receiver's queue and VM, the mediated sockets it would get.
        let to = c.end(other(s));
        let parts = parts_of(m.data.len());
        let busy = if !to.out.is_empty() && to.out.len() + parts > self.budgets.queue {
            Some(format!(
                "the queue toward {} is full ({} events)",
                self.vm_name(receiver),
                to.out.len()
            ))
        } else if self
            .vms
            .get(receiver)
            .is_some_and(|v| v.usage.over(&self.budgets, m.fds.len(), m.data.len()))
        {
            Some(format!(
                "the hub holds {} fds and {} bytes for {} (its budget)",
                self.vms.get(receiver).map_or(0, |v| v.usage.fds),
                self.vms.get(receiver).map_or(0, |v| v.usage.bytes),
                self.vm_name(receiver)
            ))
        } else {
            let n = sockets.iter().filter(|x| x.is_some()).count();
            (n > 0 && self.conns_of(receiver) + n > self.budgets.conns).then(|| {
                format!(
                    "{} has {} connections (its budget)",
                    self.vm_name(receiver),
                    self.budgets.conns
                )
            })
        };
        if let Some(reason) = busy {
            d.verdict = Err(Denial::new(Refusal::Busy, reason));
            return d;
        }
        d.verdict = Ok(Plan {
            caps,
            receiver_vfds,
            sender_vfds,
            approved,
            sockets,
        });
        d
    }

    /// Carries out an approved send: what can fail first (kernel-level attenuation, the
    /// mediated sockets' socketpairs; a failure refuses the send with nothing changed), then
    /// the handle table, the deliveries (all of the send's parts together) and the verdict.
    pub(super) fn commit(&mut self, id: ConnId, s: Side, plan: Plan, m: Msg) {
        let at = At::Conn(id, s);
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (sender, receiver) = (c.end(s).vm, c.end(other(s)).vm);
        let vmm_ends = c.vmm_ends;
        let (origin, dir) = ((c.service.clone(), c.client.vm, c.provider.vm), dir_from(s));
        let probes = self.track_attenuated(&plan.approved, &m.fds);
        let mut fds = match self.attenuate_memfds(&plan.approved, m.fds) {
            Ok(fds) => fds,
            Err(reason) => {
                return self.refuse(at, m.seq, Denial::new(Refusal::Busy, reason));
            }
        };
        let mut meds = Vec::new();
        for (i, stream) in plan.sockets.iter().enumerate() {
            let (Some(stream), Some(a)) = (stream, plan.approved.get(i)) else {
                continue;
            };
            let Some(slot) = fds.get_mut(i) else {
                continue;
            };
            let OutFd::Own(_) = slot else {
                continue;
            };
            match self.mediated(receiver, sender, origin.clone(), dir, a, *stream) {
                Ok((med, vmm_end)) => {
                    let target = std::mem::replace(slot, OutFd::Own(vmm_end));
                    if let OutFd::Own(x) = target {
                        meds.push((med, x));
                    }
                }
                Err(e) => {
                    log::warn!("conn {id}: cannot mediate a socket: {e}");
                    return self.refuse(
                        at,
                        m.seq,
                        Denial::new(Refusal::Busy, format!("socketpair: {e}")),
                    );
                }
            }
        }
        let hop = Hop {
            caps: &plan.caps,
            dir,
            sender,
            receiver,
            receiver_vfds: plan.receiver_vfds,
            sender_vfds: plan.sender_vfds,
            conn_ends: &vmm_ends,
            hub_ends: &self.hub_ends,
        };
        router::commit(&mut self.handles, hop, &plan.approved);
        for (key, probe) in probes {
            self.handles.set_probe(key, probe);
        }
        for (med, target) in meds {
            self.insert_med(med, target);
        }
        let mut infos = heapless::Vec::new();
        for a in &plan.approved {
            let info = FdInfo {
                fd_type: a.class.fd_type(),
                write_end: a.class.kind == FdKind::PipeWrite,
                rights: a.rights,
            };
            if infos.push(info).is_err() {
                break; // cannot happen: at most MAX_FDS arrived
            }
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.allowed_frames = c.allowed_frames.saturating_add(1);
        }
        self.deliver(At::Conn(id, other(s)), m.data, infos, fds);
        self.verdict(at, m.seq, Ok(()));
    }

    /// Queues one send toward `to`, split into parts of at most `PART_DATA` bytes (the
    /// fds with the first), all together.
    pub(super) fn deliver(
        &mut self,
        to: At,
        data: Vec<u8>,
        infos: heapless::Vec<FdInfo, MAX_FDS>,
        fds: Vec<OutFd>,
    ) {
        if data.len() <= PART_DATA {
            let ev = ConnEvent::Deliver { data, fds: infos };
            return self.queue_event(to, &ev, fds);
        }
        let mut first = Some((infos, fds));
        for chunk in data.chunks(PART_DATA) {
            let (infos, fds) = first.take().unwrap_or_default();
            let ev = ConnEvent::Deliver {
                data: chunk.to_vec(),
                fds: infos,
            };
            self.queue_event(to, &ev, fds);
        }
    }

    /// Refuses the send whose last part was `seq` at `at`: one audit record, one `Refused`.
    pub(super) fn refuse(&mut self, at: At, seq: u32, den: Denial) {
        let generation = self.store.current().number;
        if let Some((src, obj)) = self.describe_at(at) {
            self.audit.record(Entry {
                generation,
                rules: den.rules,
                src,
                verb: "transfer",
                obj,
                fds: den.fds,
                allowed: false,
                reason: Some(den.reason),
                similar: 0,
            });
        }
        self.verdict(at, seq, Err(den.refusal));
    }

    /// Who sends at `at`, and what the audit log calls the hop.
    fn describe_at(&self, at: At) -> Option<(String, String)> {
        match at {
            At::Conn(id, s) => {
                let c = self.conns.get(&id)?;
                let (src, dst) = (c.end(s).vm, c.end(other(s)).vm);
                Some((
                    self.vm_name(src),
                    format!(
                        "{}@{} conn {id} {} → {}",
                        c.service,
                        self.vm_name(c.provider.vm),
                        dir_from(s),
                        self.vm_name(dst)
                    ),
                ))
            }
            At::Med(id) => {
                let m = self.meds.get(&id)?;
                Some((
                    self.vm_name(m.end.vm),
                    format!(
                        "mediated socket {id} of {}@{} → {}",
                        m.origin.0,
                        self.vm_name(m.origin.2),
                        self.vm_name(m.owner)
                    ),
                ))
            }
        }
    }
}

/// `memfd:read+map`-style text for each fd, for the audit log.
pub(super) fn describe(ins: &[FdIn]) -> Vec<String> {
    ins.iter()
        .map(|f| match &f.class {
            Ok(c) => router::describe(c.kind, f.requested),
            Err(e) => format!("unclassifiable({e}):{}", f.requested),
        })
        .collect()
}
