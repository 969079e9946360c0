//! Mediated sockets: no raw socket crosses between VMs.
//!
//! A socket in an approved send (the connection's contract passes `socket`) is not handed
//! to the receiver. The hub keeps it (the **target**) and gives the receiver instead its end
//! of a new hub connection (a SOCK_SEQPACKET socket speaking the connection protocol, like
//! one from `Connected`), whose sends the hub checks under the rights the receiver got on
//! the socket and the caps of the connection it came over:
//!
//! - a send from the receiver needs `send`, and `send-fds` if it carries fds; its fds pass
//!   the same transfer check as on the original connection, in the direction toward the
//!   VM that passed the socket (its **owner**), and its data and fds are written to the
//!   target;
//! - with `recv`, what arrives on the target is read by the hub, its fds checked as a
//!   transfer from the owner, and delivered to the receiver as `Deliver`s; without
//!   `recv` the hub never reads the target. A read it must refuse closes the mediated
//!   socket (a byte stream cannot skip a piece);
//! - sockets are not passed over a mediated socket (in either direction), and a mediated
//!   socket's own end, like every hub connection's, is never passed on (`router.rs`);
//! - the connection it came over is re-checked under each new policy generation, as for
//!   the connection itself.
//!
//! Which sockets can be mediated ([`Hub::vet_socket`]): connected `AF_UNIX` stream and
//! seqpacket sockets, not listening, and not one that may be a channel to the hub itself:
//! the ends of the hub's connections are known and refused (`router.rs`), and a seqpacket
//! socket made by whoever made the hub's VM channels (init: the same `SO_PEERCRED`) is
//! refused, since it may be a VM channel.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use bulkhead_policy::{Direction, Rights};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

use crate::channel::{peer_credentials, Channel};
use crate::classify::{classify, FdKind, ObjKey};

use super::audit::Entry;
use super::conn::ConnDecision;
use super::end::{At, End};
use super::handles::VmIdx;
use super::protocol::{ConnId, Refusal};
use super::route::{describe, Denial, Msg};
use super::router::{self, Approved, FdIn, Hop};
use super::target::Target;
use super::Hub;

/// A mediated socket.
pub(super) struct Mediated {
    /// The receiving VM's end.
    pub(super) end: End,
    pub(super) target: Target,
    /// The VM that passed the socket.
    pub(super) owner: VmIdx,
    /// The connection it came over: service, client, provider.
    pub(super) origin: (String, VmIdx, VmIdx),
    /// The direction of the receiver's sends (toward the owner) under the origin's caps.
    pub(super) to_owner: Direction,
    /// The receiver's rights on the socket.
    pub(super) rights: Rights,
    /// The socket's identity (the receiver's handle-table entry is on it).
    pub(super) key: ObjKey,
    /// The identity of the receiver's end.
    pub(super) vmm_end: ObjKey,
    /// The origin's standing, cached per generation.
    pub(super) caps: Option<ConnDecision>,
    pub(super) allowed_frames: u32,
}

/// A mediated socket made for a send not yet committed ([`Hub::insert_med`] adds it).
pub(super) struct NewMed {
    end: End,
    owner: VmIdx,
    origin: (String, VmIdx, VmIdx),
    to_owner: Direction,
    rights: Rights,
    key: ObjKey,
    vmm_end: ObjKey,
    stream: bool,
}

pub(super) fn reverse(d: Direction) -> Direction {
    match d {
        Direction::C2s => Direction::S2c,
        Direction::S2c => Direction::C2s,
    }
}

/// `vfds` quotas of (the receiver, the owner) from a standing, for sends toward the owner.
pub(super) fn quotas(standing: &ConnDecision, to_owner: Direction) -> (u64, u64) {
    let [client, provider] = standing.vfds;
    match to_owner {
        // The receiver is the client and sends toward the provider.
        Direction::C2s => (client, provider),
        Direction::S2c => (provider, client),
    }
}

impl Hub {
    /// Can the socket `fd` be mediated? `Ok(true)` for a stream, `Ok(false)` for seqpacket.
    pub(super) fn vet_socket(&self, fd: BorrowedFd<'_>) -> Result<bool, String> {
        let addr: SockaddrStorage =
            getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        if addr.family() != Some(AddressFamily::Unix) {
            return Err("not a Unix socket".into());
        }
        let stream = match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::Stream) => true,
            Ok(SockType::SeqPacket) => false,
            Ok(t) => return Err(format!("a {t:?} socket (only stream and seqpacket)")),
            Err(e) => return Err(format!("SO_TYPE: {e}")),
        };
        if getsockopt(&fd, sockopt::AcceptConn).unwrap_or(true) {
            return Err("a listening socket".into());
        }
        // The ends of the hub's own connections are refused before this, exactly (their
        // identities are known: `router.rs`).
        let cred = peer_credentials(fd).map_err(|_| "not connected".to_string())?;
        if !stream && self.chan_makers.contains(&cred) {
            return Err(
                "a seqpacket socket made by whoever made the VM channels (it may be one)".into(),
            );
        }
        Ok(stream)
    }

    /// Makes the receiver's end of a mediated socket for `a`, passed by `owner` to
    /// `receiver` over the connection `origin` in direction `dir`.
    pub(super) fn mediated(
        &self,
        receiver: VmIdx,
        owner: VmIdx,
        origin: (String, VmIdx, VmIdx),
        dir: Direction,
        a: &Approved,
        stream: bool,
    ) -> Result<(NewMed, OwnedFd), String> {
        let (vmm, hub) = Channel::pair().map_err(|e| e.to_string())?;
        hub.set_nonblocking(true).map_err(|e| e.to_string())?;
        let vmm_end = ObjKey::of(vmm.as_fd()).map_err(|e| e.to_string())?;
        Ok((
            NewMed {
                end: End::new(receiver, hub),
                owner,
                origin,
                to_owner: reverse(dir),
                rights: a.rights,
                key: a.class.key,
                vmm_end,
                stream,
            },
            vmm.into_fd(),
        ))
    }

    /// Adds a mediated socket (its send committed) with `target`, the socket itself.
    pub(super) fn insert_med(&mut self, n: NewMed, target: OwnedFd) {
        let id = self.new_conn_id();
        self.hub_ends.insert(n.vmm_end, id);
        self.meds.insert(
            id,
            Mediated {
                end: n.end,
                target: Target::new(target, n.stream),
                owner: n.owner,
                origin: n.origin,
                to_owner: n.to_owner,
                rights: n.rights,
                key: n.key,
                vmm_end: n.vmm_end,
                caps: None,
                allowed_frames: 0,
            },
        );
    }

    /// The origin's standing under `gen` (cached per generation).
    pub(super) fn med_standing(
        &mut self,
        id: ConnId,
        gen: &super::reload::Generation,
    ) -> Option<ConnDecision> {
        let m = self.meds.get(&id)?;
        if let Some(d) = &m.caps {
            if d.generation == gen.number {
                return Some(d.clone());
            }
        }
        let d = self.standing_of(m.origin.1, &m.origin.0, m.origin.2, gen);
        if let Some(m) = self.meds.get_mut(&id) {
            m.caps = Some(d.clone());
        }
        Some(d)
    }

    /// Is the connection mediated socket `id` came over still allowed (under the running
    /// generation)?
    pub(super) fn med_allowed(&mut self, id: ConnId) -> bool {
        let gen = self.store.current();
        self.med_standing(id, &gen)
            .is_some_and(|d| d.caps.is_some())
    }

    /// A whole send from the receiver of mediated socket `id`, toward its target.
    pub(super) fn route_med(&mut self, id: ConnId, m: Msg) {
        let at = At::Med(id);
        let gen = self.store.current();
        let Some(standing) = self.med_standing(id, &gen) else {
            return;
        };
        let Some(med) = self.meds.get(&id) else {
            return;
        };
        let decided = (|| {
            let Some(caps) = standing.caps.clone() else {
                return Err(Denial::new(
                    Refusal::PermissionDenied,
                    format!(
                        "generation {} no longer allows the connection this socket came over",
                        gen.number
                    ),
                ));
            };
            if !med.rights.contains(Rights::SEND) {
                return Err(Denial::new(
                    Refusal::PermissionDenied,
                    format!("rights {} on this socket lack send", med.rights),
                ));
            }
            if !m.fds.is_empty() && !med.rights.contains(Rights::SEND_FDS) {
                return Err(Denial::new(
                    Refusal::PermissionDenied,
                    format!("rights {} on this socket lack send-fds", med.rights),
                ));
            }
            if med.target.stream && m.data.is_empty() && !m.fds.is_empty() {
                return Err(Denial::new(
                    Refusal::InvalidArgs,
                    "fds without data cannot go over a stream socket".into(),
                ));
            }
            let ins: Vec<FdIn> = m
                .fds
                .iter()
                .zip(m.rights.iter())
                .map(|(fd, r)| FdIn {
                    class: classify(fd.as_fd()),
                    requested: *r,
                })
                .collect();
            let (sender_vfds, receiver_vfds) = quotas(&standing, med.to_owner);
            let hop = Hop {
                caps: &caps,
                dir: med.to_owner,
                sender: med.end.vm,
                receiver: med.owner,
                receiver_vfds,
                sender_vfds,
                conn_ends: &[med.vmm_end],
                hub_ends: &self.hub_ends,
            };
            let approved =
                router::check_frame(&gen.policy, hop, &self.handles, &ins).map_err(|rej| {
                    Denial {
                        refusal: rej.refusal,
                        reason: rej.reason,
                        rules: rej.rules,
                        fds: describe(&ins),
                    }
                })?;
            if approved.iter().any(|a| a.class.kind == FdKind::Socket) {
                return Err(Denial::new(
                    Refusal::PermissionDenied,
                    "sockets are not passed over a mediated socket".into(),
                ));
            }
            if med.target.out.len() >= self.budgets.queue
                || self
                    .vms
                    .get(med.owner)
                    .is_some_and(|v| v.usage.over(&self.budgets, m.fds.len(), m.data.len()))
            {
                return Err(Denial::new(
                    Refusal::Busy,
                    "the socket's peer is not reading".into(),
                ));
            }
            Ok((caps, approved, sender_vfds, receiver_vfds))
        })();
        let (caps, approved, sender_vfds, receiver_vfds) = match decided {
            Ok(x) => x,
            Err(den) => return self.refuse(at, m.seq, den),
        };
        let (sender, receiver, to_owner, vmm_end) =
            (med.end.vm, med.owner, med.to_owner, med.vmm_end);
        let probes = self.track_attenuated(&approved, &m.fds);
        let fds = match self.attenuate_memfds(&approved, m.fds) {
            Ok(f) => f,
            Err(reason) => return self.refuse(at, m.seq, Denial::new(Refusal::Busy, reason)),
        };
        let hop = Hop {
            caps: &caps,
            dir: to_owner,
            sender,
            receiver,
            receiver_vfds,
            sender_vfds,
            conn_ends: &[vmm_end],
            hub_ends: &self.hub_ends,
        };
        router::commit(&mut self.handles, hop, &approved);
        for (key, probe) in probes {
            self.handles.set_probe(key, probe);
        }
        let Some(med) = self.meds.get_mut(&id) else {
            return;
        };
        med.allowed_frames = med.allowed_frames.saturating_add(1);
        let (n_fds, n_bytes) = med.target.push(&m.data, fds);
        if let Some(slot) = self.vms.get_mut(receiver) {
            slot.usage.hold(n_fds, n_bytes);
        }
        self.verdict(at, m.seq, Ok(()));
        if !self.defer_flush {
            self.flush_target(id);
        }
    }

    /// Closes a mediated socket once one side is done and what was queued toward the other
    /// is out.
    pub(super) fn finish_med_if_drained(&mut self, id: ConnId) {
        let done = self.meds.get(&id).is_some_and(|m| {
            (m.end.eof && m.target.out.is_empty()) || (m.target.eof && m.end.out.is_empty())
        });
        if done {
            self.close_med(id);
        }
    }

    /// Closes mediated socket `id`: the receiver's end reads EOF, the hub's copy of the
    /// socket is closed, and the receiver's entry on it goes.
    pub(super) fn close_med(&mut self, id: ConnId) {
        let Some(m) = self.meds.remove(&id) else {
            return;
        };
        self.hub_ends.remove(&m.vmm_end);
        if m.allowed_frames > 0 {
            let generation = self.store.current().number;
            self.audit.record(Entry {
                generation,
                src: self.vm_name(m.end.vm),
                verb: "transfer",
                obj: format!(
                    "mediated socket {id} of {}@{} (allowed frames, summary)",
                    m.origin.0,
                    self.vm_name(m.origin.2)
                ),
                allowed: true,
                similar: m.allowed_frames,
                ..Entry::default()
            });
        }
        self.discharge_end(&m.end);
        let (fds, bytes, inflight) = m.target.held();
        if let Some(slot) = self.vms.get_mut(m.owner) {
            slot.usage.release(fds, bytes);
            slot.usage.inflight = slot.usage.inflight.saturating_sub(inflight);
        }
        self.handles.release(m.end.vm, m.key);
    }
}
