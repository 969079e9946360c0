//! One VMM's end of a connection or mediated socket, as the hub sees it: reading it in
//! `recvmmsg` batches (no more than its queue has room to answer), the queue of events toward
//! it and their flush within its VM's in-flight budget (`SIOCOUTQ`), verdicts, and `Ready`
//! for ends refused `Busy`.
//!
//! Each end is read while the queue toward it has room for the verdicts its frames earn
//! (one per send); whether the *other* side can take a delivery is decided per send
//! (`Busy` if not), so a sender always hears what became of each send, promptly, and never
//! waits on a receiver that does not read.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use bulkhead_policy::Rights;

use crate::channel::{close_fds, Channel, ChannelError, RawFrame};
use crate::frame::MAX_FDS;

use super::conn::{other, Side};
use super::handles::VmIdx;
use super::protocol::{ConnEvent, ConnId, Refusal};
use super::queue::{encode_event, flush_events, Out, OutFd, Stop};
use super::route::Denial;
use super::{Hub, READ_BUDGET};

/// Where a frame came from, or where an event goes: one side of a connection, or the VM's
/// end of a mediated socket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum At {
    Conn(ConnId, Side),
    Med(ConnId),
}

impl At {
    pub(super) fn id(self) -> ConnId {
        match self {
            At::Conn(id, _) | At::Med(id) => id,
        }
    }
}

/// A send arriving in parts (`ConnSend::part`), held until its last part.
pub(super) struct Partial {
    pub(super) last_seq: u32,
    pub(super) next_part: u16,
    pub(super) data: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) rights: heapless::Vec<Rights, MAX_FDS>,
    /// Refused already (its data and fds dropped); the verdict goes out with the last part.
    pub(super) poisoned: Option<(Refusal, String)>,
}

/// One VMM's end of a connection, as the hub sees it.
pub(super) struct End {
    pub(super) vm: VmIdx,
    pub(super) sock: Channel,
    /// Events for this end's VMM not yet sent.
    pub(super) out: VecDeque<Out>,
    /// fds and bytes in `out` (charged to `vm`).
    pub(super) out_fds: usize,
    pub(super) out_bytes: usize,
    /// fds sent on `sock` since its send queue was last seen empty (`SIOCOUTQ`): an upper
    /// bound on the fds in flight to this VMM through it (charged to `vm`).
    pub(super) inflight: usize,
    /// A send from this end's VMM still arriving (its data and fds charged to `vm`).
    pub(super) partial: Option<Partial>,
    /// A send from this end was refused `Busy`: say `Ready` when there is room.
    pub(super) owe_ready: bool,
    /// The VMM hung up while its queue was full: leave the socket out of the poll set
    /// (POLLHUP would spin) unless there is something to send.
    pub(super) hung_up: bool,
    /// The hub read EOF from this end: nothing more comes; the connection closes once the
    /// frames queued toward the other end are delivered.
    pub(super) eof: bool,
}

impl End {
    pub(super) fn new(vm: VmIdx, sock: Channel) -> End {
        End {
            vm,
            sock,
            out: VecDeque::new(),
            out_fds: 0,
            out_bytes: 0,
            inflight: 0,
            partial: None,
            owe_ready: false,
            hung_up: false,
            eof: false,
        }
    }

    /// Everything this end holds on its VM's account: (fds, bytes) queued or partial.
    pub(super) fn held(&self) -> (usize, usize) {
        let (pf, pb) = self
            .partial
            .as_ref()
            .map_or((0, 0), |p| (p.fds.len(), p.data.len()));
        (self.out_fds + pf, self.out_bytes + pb)
    }
}

/// Bytes waiting in a socket's send queue (`SIOCOUTQ`); `None` if the kernel will not say.
pub(super) fn outq(fd: std::os::fd::BorrowedFd<'_>) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (the same number as TIOCOUTQ) writes one int into `n`, which
    // outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r < 0 {
        return None;
    }
    usize::try_from(n).ok()
}

impl Hub {
    pub(super) fn end(&self, at: At) -> Option<&End> {
        match at {
            At::Conn(id, s) => self.conns.get(&id).map(|c| c.end(s)),
            At::Med(id) => self.meds.get(&id).map(|m| &m.end),
        }
    }

    pub(super) fn end_mut(&mut self, at: At) -> Option<&mut End> {
        match at {
            At::Conn(id, s) => self.conns.get_mut(&id).map(|c| c.end_mut(s)),
            At::Med(id) => self.meds.get_mut(&id).map(|m| &mut m.end),
        }
    }

    /// Reads a batch from one end; what it queued is flushed once after the batch (with
    /// `sendmmsg`), so both VMMs see bursts rather than one wake-up per frame.
    pub(super) fn read_end(&mut self, at: At) {
        self.defer_flush = true;
        self.read_end_batch(at);
        self.defer_flush = false;
        self.bury(); // on every path out of the read, before the deliveries go out
        match at {
            At::Conn(id, s) => {
                self.flush_end(At::Conn(id, other(s)));
                self.flush_end(at);
                self.finish_if_drained(id);
            }
            At::Med(id) => {
                self.flush_target(id);
                self.flush_end(at);
                self.finish_med_if_drained(id);
            }
        }
    }

    /// Reads frames from one end with `recvmmsg` batches until the socket is empty, the
    /// queue toward the end has no room for more verdicts (the rest stays in its socket:
    /// back-pressure on a VMM that does not read what it is told), or `READ_BUDGET` frames
    /// were read. Each frame is taken on its own (`frame`); after each batch the senders'
    /// fds it consumed are closed, and `read_end` then sends everything queued.
    fn read_end_batch(&mut self, at: At) {
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let limit = self.budgets.queue;
            // Field by field, so the receive buffers can be borrowed beside it.
            let e = match at {
                At::Conn(id, s) => self.conns.get(&id).map(|c| c.end(s)),
                At::Med(id) => self.meds.get(&id).map(|m| &m.end),
            };
            let Some(e) = e else {
                return;
            };
            if e.eof {
                return;
            }
            // Never read more than the queue can take: every frame read may queue one
            // verdict, and the bound stays exact.
            let room = limit.saturating_sub(e.out.len()).min(budget);
            if room == 0 {
                return;
            }
            let mut got = std::mem::take(&mut self.rx_out);
            got.clear();
            let res = e.sock.try_recv_frames(&mut self.rx, room, &mut got);
            let asked = room.min(crate::channel::RECV_BATCH);
            match res {
                Ok(()) => {}
                Err(ChannelError::WouldBlock) => {
                    self.rx_out = got;
                    return;
                }
                Err(_) => {
                    // Closed, or the socket failed: nothing more comes from this end.
                    self.rx_out = got;
                    self.end_eof(at);
                    return;
                }
            }
            let n = got.len();
            budget = budget.saturating_sub(n.max(1));
            let mut eof = false;
            for outcome in got.drain(..) {
                match outcome {
                    Ok(RawFrame { bytes, fds }) => self.frame(at, bytes, fds),
                    Err(ChannelError::Closed) | Err(ChannelError::Sys { .. }) => {
                        eof = true;
                        break;
                    }
                    Err(ChannelError::Truncated {
                        control: true,
                        fds_closed,
                        ..
                    }) if fds_closed < MAX_FDS => {
                        // Fewer than MAX_FDS arrived and the rest were cut: the hub's own fd
                        // table was full. Not the sender's fault: back-pressure.
                        let why = "the hub's fd table is full".to_string();
                        self.refuse(at, 0, Denial::new(Refusal::Busy, why));
                    }
                    Err(e) => {
                        // Truncated / empty / oversize: consumed, fds closed. Refuse it.
                        self.refuse(at, 0, Denial::new(Refusal::InvalidArgs, e.to_string()));
                    }
                }
            }
            self.rx_out = got;
            if eof {
                self.end_eof(at);
                return;
            }
            // The senders' fds this batch replaced close now; the deliveries (and verdicts)
            // go out once the read is over (`read_end`): one burst of up to the queue limit
            // wakes the receiver once, where a flush per batch let it wake (and preempt the
            // hub on a busy machine) twice as often, for more CPU per frame on both sides
            // (measured, docs/ipc.md §7).
            self.bury();
            if n < asked {
                return; // the socket was empty: no need for a call that says EAGAIN
            }
        }
    }

    /// The hub read EOF (or an error) from one end: nothing more comes from it. A send it
    /// left unfinished is dropped.
    pub(super) fn end_eof(&mut self, at: At) {
        let Some(me) = self.end_mut(at) else {
            return;
        };
        me.eof = true;
        let vm = me.vm;
        let partial = me.partial.take();
        let (fds, bytes) = (me.out_fds, me.out_bytes);
        me.out.clear(); // verdicts for a sender that left
        me.out_fds = 0;
        me.out_bytes = 0;
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.usage.release(fds, bytes);
            if let Some(p) = &partial {
                slot.usage.release(p.fds.len(), p.data.len());
            }
        }
    }

    /// Queues `ev` (with `fds`) toward `at`'s VMM, charged to its VM; flushed at once unless
    /// a batch is being read.
    pub(super) fn queue_event(&mut self, at: At, ev: &ConnEvent, fds: Vec<OutFd>) {
        let bytes = match encode_event(ev) {
            Ok(b) => b,
            Err(e) => {
                log::error!("conn {}: cannot encode an event: {e}", at.id());
                return;
            }
        };
        let Some(end) = self.end_mut(at) else {
            return;
        };
        let (n, len) = (fds.len(), bytes.len());
        end.out_fds += n;
        end.out_bytes += len;
        end.out.push_back(Out { bytes, fds });
        let vm = end.vm;
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.usage.hold(n, len);
        }
        if !self.defer_flush {
            self.flush_end(at);
        }
    }

    /// The verdict on the send whose last part was `seq`, to its sender.
    pub(super) fn verdict(&mut self, at: At, seq: u32, v: Result<(), Refusal>) {
        let ev = match v {
            Ok(()) => ConnEvent::Accepted { seq },
            Err(error) => {
                if error == Refusal::Busy {
                    if let Some(e) = self.end_mut(at) {
                        if !e.owe_ready {
                            e.owe_ready = true;
                            self.owed_ready += 1;
                        }
                    }
                }
                ConnEvent::Refused { seq, error }
            }
        };
        self.queue_event(at, &ev, Vec::new());
    }

    /// Sends what is queued toward `at`'s VMM, packed, within its VM's in-flight budget.
    pub(super) fn flush_end(&mut self, at: At) {
        let budget = self.budgets.inflight;
        let Some(e) = self.end(at) else {
            return;
        };
        if e.out.is_empty() {
            return;
        }
        let vm = e.vm;
        // What went out earlier and has been received since no longer counts.
        if e.inflight > 0 && outq(e.sock.as_fd()) == Some(0) {
            let was = e.inflight;
            if let Some(e) = self.end_mut(at) {
                e.inflight = 0;
            }
            if let Some(slot) = self.vms.get_mut(vm) {
                slot.usage.inflight = slot.usage.inflight.saturating_sub(was);
            }
        }
        let used = self.vms.get(vm).map_or(0, |s| s.usage.inflight);
        let mut room = budget.saturating_sub(used);
        if room < MAX_FDS && used > 0 {
            // Over (or at) the budget: refresh every socket of this VM, then try again.
            self.refresh_inflight(vm);
            let used = self.vms.get(vm).map_or(0, |s| s.usage.inflight);
            room = budget.saturating_sub(used);
        }
        let mut grave = std::mem::take(&mut self.grave);
        let res = match self.end_mut(at) {
            Some(e) => flush_events(&e.sock, &mut e.out, room, &mut grave).map(|(sent, stop)| {
                e.out_fds = e.out_fds.saturating_sub(sent.fds);
                e.out_bytes = e.out_bytes.saturating_sub(sent.bytes);
                e.inflight += sent.fds;
                (sent, stop)
            }),
            None => return,
        };
        close_fds(&mut grave);
        self.grave = grave;
        match res {
            Ok((sent, stop)) => {
                if let Some(slot) = self.vms.get_mut(vm) {
                    slot.usage.release(sent.fds, sent.bytes);
                    slot.usage.inflight += sent.fds;
                }
                if matches!(stop, Stop::Budget | Stop::Resource) {
                    self.stalled = true;
                }
            }
            Err(e) => {
                log::debug!("conn {}: {e}; closing", at.id());
                match at {
                    At::Conn(id, _) => self.close_conn(id, 0),
                    At::Med(id) => self.close_med(id),
                }
            }
        }
    }

    /// Re-reads `SIOCOUTQ` on every socket toward `vm` that has fds in flight: those whose
    /// queue is empty have delivered them all.
    pub(super) fn refresh_inflight(&mut self, vm: VmIdx) {
        fn check(sock: std::os::fd::BorrowedFd<'_>, inflight: &mut usize, freed: &mut usize) {
            if *inflight > 0 && outq(sock) == Some(0) {
                *freed += *inflight;
                *inflight = 0;
            }
        }
        let mut freed = 0usize;
        for c in self.conns.values_mut() {
            for e in [&mut c.client, &mut c.provider] {
                if e.vm == vm {
                    check(e.sock.as_fd(), &mut e.inflight, &mut freed);
                }
            }
        }
        for m in self.meds.values_mut() {
            if m.end.vm == vm {
                check(m.end.sock.as_fd(), &mut m.end.inflight, &mut freed);
            }
            if m.owner == vm {
                check(m.target.sock.as_fd(), &mut m.target.inflight, &mut freed);
            }
        }
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.usage.inflight = slot.usage.inflight.saturating_sub(freed);
        }
    }

    /// Ends that were refused `Busy` hear `Ready` once there is room toward their peer again
    /// (half the queue, and their peer's VM under its budgets).
    pub(super) fn grant_ready(&mut self) {
        if self.owed_ready == 0 {
            return;
        }
        let half = self.budgets.queue / 2;
        let mut ready = Vec::new();
        for (id, c) in &self.conns {
            for s in [Side::Client, Side::Provider] {
                let (me, peer) = (c.end(s), c.end(other(s)));
                if me.owe_ready && peer.out.len() <= half && !self.vm_over(peer.vm) {
                    ready.push(At::Conn(*id, s));
                }
            }
        }
        for (id, m) in &self.meds {
            if m.end.owe_ready && m.target.out.len() <= half && !self.vm_over(m.owner) {
                ready.push(At::Med(*id));
            }
        }
        for at in ready {
            if let Some(e) = self.end_mut(at) {
                e.owe_ready = false;
            }
            self.owed_ready = self.owed_ready.saturating_sub(1);
            self.queue_event(at, &ConnEvent::Ready, Vec::new());
        }
        if self.conns.is_empty() && self.meds.is_empty() {
            self.owed_ready = 0;
        }
    }

    /// Is `vm` at its held-fds or bytes budget (half of it, for `Ready`)?
    fn vm_over(&self, vm: VmIdx) -> bool {
        self.vms.get(vm).is_some_and(|s| {
            s.usage.fds > self.budgets.fds / 2 || s.usage.bytes > self.budgets.bytes / 2
        })
    }
}
