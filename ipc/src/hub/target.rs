//! The target of a mediated socket (`mediate.rs`): the socket another VM passed, kept by the
//! hub. What the receiver sends is written to it (stream sends may be partial: the fds go
//! with the first byte), within the owner's in-flight budget; with `recv`, what arrives on
//! it is read, its fds checked as a transfer from the owner, and delivered to the receiver,
//! or the mediated socket is closed.

use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use bulkhead_policy::Rights;
use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::channel::close_fds;
use crate::classify::{classify, FdKind};
use crate::frame::MAX_FDS;

use super::audit::Entry;
use super::end::{outq, At};
use super::mediate::{quotas, reverse};
use super::protocol::{ConnId, FdInfo, PART_DATA};
use super::queue::OutFd;
use super::router::{self, FdIn, Hop};
use super::Hub;

/// Most reads from one target per wake-up (then the others get a turn).
const TARGET_READS: usize = 32;

/// Data (from a position) and fds waiting to be written to a target.
pub(super) struct RawOut {
    data: Vec<u8>,
    off: usize,
    fds: Vec<OutFd>,
}

impl RawOut {
    pub(super) fn new(data: Vec<u8>, fds: Vec<OutFd>) -> RawOut {
        RawOut { data, off: 0, fds }
    }
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

impl Target {
    pub(super) fn new(sock: OwnedFd, stream: bool) -> Target {
        Target {
            sock,
            stream,
            out: VecDeque::new(),
            out_fds: 0,
            out_bytes: 0,
            inflight: 0,
            eof: false,
        }
    }

    /// Queues one send's data (split at `PART_DATA`, the fds with the first piece), charged
    /// as (fds, bytes), which it returns.
    pub(super) fn push(&mut self, data: &[u8], mut fds: Vec<OutFd>) -> (usize, usize) {
        let (n_fds, n_bytes) = (fds.len(), data.len());
        if data.is_empty() && fds.is_empty() {
            return (0, 0);
        }
        if data.is_empty() {
            self.out.push_back(RawOut::new(Vec::new(), fds));
        } else {
            for chunk in data.chunks(PART_DATA) {
                self.out
                    .push_back(RawOut::new(chunk.to_vec(), std::mem::take(&mut fds)));
            }
        }
        self.out_fds += n_fds;
        self.out_bytes += n_bytes;
        (n_fds, n_bytes)
    }

    /// What it holds on its owner's account: (fds, bytes) queued, fds in flight.
    pub(super) fn held(&self) -> (usize, usize, usize) {
        (self.out_fds, self.out_bytes, self.inflight)
    }
}

impl Hub {
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
