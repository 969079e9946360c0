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

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bulkhead_policy::{Direction, Rights};
use nix::errno::Errno;
use nix::sys::socket::{
    getsockname, getsockopt, recvmsg, sendmsg, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockType, SockaddrLike, SockaddrStorage,
};

use crate::channel::{close_fds, peer_credentials, Channel};
use crate::classify::{classify, FdKind, ObjKey};
use crate::frame::MAX_FDS;

use super::audit::Entry;
use super::conn::{outq, At, ConnDecision, End};
use super::handles::VmIdx;
use super::protocol::{ConnId, FdInfo, Refusal, PART_DATA};
use super::queue::OutFd;
use super::route::{describe, Denial, Msg};
use super::router::{self, Approved, FdIn, Hop};
use super::Hub;

/// Most reads from one target per wake-up (then the others get a turn).
const TARGET_READS: usize = 32;

/// Data (from a position) and fds waiting to be written to a target.
pub(super) struct RawOut {
    data: Vec<u8>,
    off: usize,
    fds: Vec<OutFd>,
}

/// The socket another VM passed, kept by the hub.
pub(super) struct Target {
    pub(super) sock: OwnedFd,
    pub(super) stream: bool,
    pub(super) out: VecDeque<RawOut>,
    /// fds and bytes in `out` (charged to the owner).
    out_fds: usize,
    out_bytes: usize,
    /// fds written since its send queue was last seen empty (charged to the owner's
    /// in-flight budget, as for a connection's end).
    pub(super) inflight: usize,
    /// The hub read EOF from it.
    pub(super) eof: bool,
}

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

fn reverse(d: Direction) -> Direction {
    match d {
        Direction::C2s => Direction::S2c,
        Direction::S2c => Direction::C2s,
    }
}

/// `vfds` quotas of (the receiver, the owner) from a standing, for sends toward the owner.
fn quotas(standing: &ConnDecision, to_owner: Direction) -> (u64, u64) {
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
                target: Target {
                    sock: target,
                    stream: n.stream,
                    out: VecDeque::new(),
                    out_fds: 0,
                    out_bytes: 0,
                    inflight: 0,
                    eof: false,
                },
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
    fn med_standing(
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
        let mut fds = match self.attenuate_memfds(&approved, m.fds) {
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
        let (mut n_fds, n_bytes) = (fds.len(), m.data.len());
        if m.data.is_empty() && fds.is_empty() {
            n_fds = 0;
        } else if m.data.is_empty() {
            med.target.out.push_back(RawOut {
                data: Vec::new(),
                off: 0,
                fds: std::mem::take(&mut fds),
            });
        } else {
            for chunk in m.data.chunks(PART_DATA) {
                med.target.out.push_back(RawOut {
                    data: chunk.to_vec(),
                    off: 0,
                    fds: std::mem::take(&mut fds),
                });
            }
        }
        med.target.out_fds += n_fds;
        med.target.out_bytes += n_bytes;
        if let Some(slot) = self.vms.get_mut(receiver) {
            slot.usage.hold(n_fds, n_bytes);
        }
        self.verdict(at, m.seq, Ok(()));
        if !self.defer_flush {
            self.flush_target(id);
        }
    }

    /// Writes what waits for the target of `id` (stream sends may be partial: the fds go
    /// with the first byte, the rest of the data later).
    pub(super) fn flush_target(&mut self, id: ConnId) {
        let Some(med) = self.meds.get(&id) else {
            return;
        };
        if med.target.out.is_empty() {
            return;
        }
        let owner = med.owner;
        if med.target.inflight > 0 && outq(med.target.sock.as_fd()) == Some(0) {
            let was = med.target.inflight;
            if let Some(m) = self.meds.get_mut(&id) {
                m.target.inflight = 0;
            }
            if let Some(slot) = self.vms.get_mut(owner) {
                slot.usage.inflight = slot.usage.inflight.saturating_sub(was);
            }
        }
        let budget = self.budgets.inflight;
        let mut room = budget.saturating_sub(self.vms.get(owner).map_or(0, |v| v.usage.inflight));
        if room < MAX_FDS {
            self.refresh_inflight(owner);
            room = budget.saturating_sub(self.vms.get(owner).map_or(0, |v| v.usage.inflight));
        }
        let mut grave = Vec::new();
        let mut broken = None;
        let mut stalled = false;
        let (mut fds_done, mut bytes_done) = (0usize, 0usize);
        let Some(med) = self.meds.get_mut(&id) else {
            return;
        };
        let t = &mut med.target;
        while let Some(o) = t.out.front_mut() {
            if o.fds.len() > room {
                stalled = true;
                break;
            }
            let rest = o.data.get(o.off..).unwrap_or_default();
            let raw: Vec<RawFd> = o.fds.iter().map(|f| f.as_fd().as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let iov = [IoSlice::new(rest)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            let r = if raw.is_empty() {
                sendmsg::<()>(t.sock.as_raw_fd(), &iov, &[], flags, None)
            } else {
                sendmsg::<()>(t.sock.as_raw_fd(), &iov, &cmsg, flags, None)
            };
            match r {
                Ok(n) => {
                    let n_fds = o.fds.len();
                    for f in o.fds.drain(..) {
                        if let OutFd::Own(f) = f {
                            grave.push(f);
                        }
                    }
                    fds_done += n_fds;
                    room = room.saturating_sub(n_fds);
                    o.off += n;
                    bytes_done += n;
                    if o.off >= o.data.len() {
                        t.out.pop_front();
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(
                    Errno::ETOOMANYREFS
                    | Errno::EMFILE
                    | Errno::ENFILE
                    | Errno::ENOBUFS
                    | Errno::ENOMEM,
                ) => {
                    stalled = true;
                    break;
                }
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        t.out_fds = t.out_fds.saturating_sub(fds_done);
        t.out_bytes = t.out_bytes.saturating_sub(bytes_done);
        t.inflight += fds_done;
        close_fds(&mut grave);
        if let Some(slot) = self.vms.get_mut(owner) {
            slot.usage.release(fds_done, bytes_done);
            slot.usage.inflight += fds_done;
        }
        if stalled {
            self.stalled = true;
        }
        if let Some(e) = broken {
            log::debug!("mediated socket {id}: send: {e}; closing");
            self.close_med(id);
        }
    }

    /// Reads what arrived on the target of `id` (only with `recv`), while the queue toward
    /// the receiver has room, and delivers it after the transfer check.
    pub(super) fn read_target(&mut self, id: ConnId) {
        for _ in 0..TARGET_READS {
            let Some(med) = self.meds.get(&id) else {
                return;
            };
            if med.target.eof
                || !med.rights.contains(Rights::RECV)
                || med.end.out.len() >= self.budgets.queue
                || self
                    .vms
                    .get(med.end.vm)
                    .is_some_and(|v| v.usage.over(&self.budgets, MAX_FDS, PART_DATA))
            {
                return;
            }
            let got = recv_raw(med.target.sock.as_fd());
            match got {
                Err(Errno::EAGAIN) => return,
                Err(e) => {
                    log::debug!("mediated socket {id}: recv: {e}");
                    return self.target_eof(id);
                }
                Ok(r) if r.data.is_empty() && r.fds.is_empty() && !r.cut => {
                    return self.target_eof(id);
                }
                Ok(r) if r.cut => {
                    self.close_refused(
                        id,
                        "more than 28 fds at once, or the hub's fd table is full".into(),
                    );
                    return;
                }
                Ok(r) => {
                    if !self.inbound(id, r.data, r.fds) {
                        return;
                    }
                }
            }
        }
    }

    /// One read from the target: check its fds as a transfer from the owner to the
    /// receiver and deliver it, or close the mediated socket. Returns whether it is open.
    fn inbound(&mut self, id: ConnId, data: Vec<u8>, fds: Vec<OwnedFd>) -> bool {
        let gen = self.store.current();
        let Some(standing) = self.med_standing(id, &gen) else {
            return false;
        };
        let Some(med) = self.meds.get(&id) else {
            return false;
        };
        let Some(caps) = standing.caps.clone() else {
            let why = format!(
                "generation {} no longer allows the connection this socket came over",
                gen.number
            );
            self.close_refused(id, why);
            return false;
        };
        let dir = reverse(med.to_owner);
        let ins: Vec<FdIn> = fds
            .iter()
            .map(|fd| {
                let class = classify(fd.as_fd());
                let requested = class.as_ref().map_or(Rights::NONE, |c| {
                    self.handles
                        .rights_of(med.owner, c.key, c.max_rights)
                        .unwrap_or(c.max_rights)
                });
                FdIn { class, requested }
            })
            .collect();
        let (receiver_vfds, owner_vfds) = quotas(&standing, med.to_owner);
        let hop = Hop {
            caps: &caps,
            dir,
            sender: med.owner,
            receiver: med.end.vm,
            receiver_vfds,
            sender_vfds: owner_vfds,
            conn_ends: &[med.vmm_end],
            hub_ends: &self.hub_ends,
        };
        let approved = match router::check_frame(&gen.policy, hop, &self.handles, &ins) {
            Ok(a) if a.iter().all(|a| a.class.kind != FdKind::Socket) => a,
            Ok(_) => {
                self.close_refused(id, "sockets are not passed over a mediated socket".into());
                return false;
            }
            Err(rej) => {
                self.close_refused(id, rej.reason);
                return false;
            }
        };
        let (sender, receiver, vmm_end) = (med.owner, med.end.vm, med.vmm_end);
        let probes = self.track_attenuated(&approved, &fds);
        let out = match self.attenuate_memfds(&approved, fds) {
            Ok(f) => f,
            Err(why) => {
                self.close_refused(id, why);
                return false;
            }
        };
        let hop = Hop {
            caps: &caps,
            dir,
            sender,
            receiver,
            receiver_vfds,
            sender_vfds: owner_vfds,
            conn_ends: &[vmm_end],
            hub_ends: &self.hub_ends,
        };
        router::commit(&mut self.handles, hop, &approved);
        for (key, probe) in probes {
            self.handles.set_probe(key, probe);
        }
        let mut infos = heapless::Vec::new();
        for a in &approved {
            let info = FdInfo {
                fd_type: a.class.fd_type(),
                write_end: a.class.kind == FdKind::PipeWrite,
                rights: a.rights,
            };
            if infos.push(info).is_err() {
                break;
            }
        }
        self.deliver(At::Med(id), data, infos, out);
        true
    }

    fn target_eof(&mut self, id: ConnId) {
        if let Some(m) = self.meds.get_mut(&id) {
            m.target.eof = true;
        }
        self.finish_med_if_drained(id);
    }

    /// Closes mediated socket `id` after a read from its target was refused.
    fn close_refused(&mut self, id: ConnId, reason: String) {
        if let Some(m) = self.meds.get(&id) {
            let generation = self.store.current().number;
            self.audit.record(Entry {
                generation,
                src: self.vm_name(m.owner),
                verb: "transfer",
                obj: format!(
                    "mediated socket {id} of {}@{} → {}",
                    m.origin.0,
                    self.vm_name(m.origin.2),
                    self.vm_name(m.end.vm)
                ),
                allowed: false,
                reason: Some(format!("{reason} (the mediated socket is closed)")),
                ..Entry::default()
            });
        }
        self.close_med(id);
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
        if let Some(slot) = self.vms.get_mut(m.owner) {
            slot.usage.release(m.target.out_fds, m.target.out_bytes);
            slot.usage.inflight = slot.usage.inflight.saturating_sub(m.target.inflight);
        }
        self.handles.release(m.end.vm, m.key);
    }
}

/// One read from a target.
struct RawIn {
    data: Vec<u8>,
    fds: Vec<OwnedFd>,
    /// Some fds were cut (`MSG_CTRUNC`).
    cut: bool,
}

/// `recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` of up to `PART_DATA` bytes and `MAX_FDS` fds;
/// every fd received is owned before anything else happens.
fn recv_raw(fd: BorrowedFd<'_>) -> Result<RawIn, Errno> {
    let mut buf = vec![0u8; PART_DATA];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, cut) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for r in raw {
                        // SAFETY: the kernel just installed `r` in this process for us;
                        // nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
        }
        (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    buf.truncate(n);
    Ok(RawIn {
        data: buf,
        fds,
        cut,
    })
}
