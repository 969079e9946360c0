//! The hub's outbound queues: what waits for a VMM to take it, and the `sendmmsg` flushes
//! that hand it over.
//!
//! - A VM channel's queue holds whole frames, one `HubEvent` each ([`flush_frames`]).
//! - A connection side's queue holds encoded `ConnEvent`s with their fds; the flush packs
//!   consecutive events into as few datagrams as the bounds allow ([`flush_events`]: a
//!   `ConnBatch` of at most `MAX_FRAME` bytes and `MAX_FDS` fds each), so a burst of
//!   deliveries and verdicts costs the hub and the VMM one datagram, not one per event.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;
use serde::Serialize;

use crate::channel::{close_fds, Channel, ChannelError, SEND_BATCH};
use crate::frame::{FrameError, MAX_FDS, MAX_FRAME, WIRE_VERSION};

/// A descriptor waiting to be sent: the hub's own, or shared with the read-only cache (a
/// memfd delivered without WRITE goes out as the cached read-only description itself, not a
/// dup of it: SCM_RIGHTS copies it into the receiver, and the hub keeps its one copy).
pub(super) enum OutFd {
    Own(OwnedFd),
    Shared(Arc<OwnedFd>),
}

impl AsFd for OutFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            OutFd::Own(f) => f.as_fd(),
            OutFd::Shared(f) => f.as_fd(),
        }
    }
}

pub(super) fn own_all(fds: Vec<OwnedFd>) -> Vec<OutFd> {
    fds.into_iter().map(OutFd::Own).collect()
}

/// One queued item: a whole frame (VM channels) or one encoded event (connections), and the
/// fds that go with it.
pub(super) struct Out {
    pub(super) bytes: Vec<u8>,
    pub(super) fds: Vec<OutFd>,
}

/// Most bytes one encoded connection event may take: it must fit a datagram on its own
/// (the version byte and a batch length of up to 5 bytes around it).
pub(super) const MAX_EVENT: usize = MAX_FRAME - 6;

/// A connection event encoded for [`flush_events`] (postcard, no version byte).
pub(super) fn encode_event<T: Serialize>(ev: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = postcard::to_stdvec(ev).map_err(FrameError::Encode)?;
    if bytes.len() > MAX_EVENT {
        return Err(FrameError::TooLarge { limit: MAX_EVENT });
    }
    Ok(bytes)
}

/// Sends queued frames, `SEND_BATCH` per `sendmmsg`, until the queue is empty or the socket
/// is full; `Err` if the peer is gone. The hub's own fds of the frames sent are closed before
/// it returns (`close_fds`).
pub(super) fn flush_frames(ch: &Channel, q: &mut VecDeque<Out>) -> Result<(), ChannelError> {
    let mut sent_fds = Vec::new();
    let r = flush_frames_into(ch, q, &mut sent_fds);
    close_fds(&mut sent_fds);
    r
}

fn flush_frames_into(
    ch: &Channel,
    q: &mut VecDeque<Out>,
    grave: &mut Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    while !q.is_empty() {
        let asked = q.len().min(SEND_BATCH);
        match ch.try_send_frames(q.iter().map(|o| (&o.bytes, o.fds.as_slice()))) {
            Ok(n) => {
                for o in q.drain(..n.min(q.len())) {
                    bury_own(o.fds, grave);
                }
                if n < asked {
                    // The socket filled up (POLLOUT resumes), or the next frame fails and
                    // the next flush reports it.
                    return Ok(());
                }
            }
            Err(ChannelError::WouldBlock) => return Ok(()),
            Err(e) if is_resource(&e) => return Ok(()),
            Err(e) => {
                q.clear();
                return Err(e);
            }
        }
    }
    Ok(())
}

fn bury_own(fds: Vec<OutFd>, grave: &mut Vec<OwnedFd>) {
    grave.extend(fds.into_iter().filter_map(|f| match f {
        OutFd::Own(f) => Some(f),
        OutFd::Shared(_) => None,
    }));
}

/// A send that failed for want of a kernel resource the hub shares with everyone: fds in
/// flight past its `RLIMIT_NOFILE` (`ETOOMANYREFS`), its own fd table (`EMFILE`, `ENFILE`),
/// memory (`ENOBUFS`, `ENOMEM`). Back-pressure: the frames stay queued and the send is tried
/// again later; never a reason to close anything.
pub(super) fn is_resource(e: &ChannelError) -> bool {
    matches!(
        e,
        ChannelError::Sys {
            errno: Errno::ETOOMANYREFS
                | Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOBUFS
                | Errno::ENOMEM,
            ..
        }
    )
}

/// Why [`flush_events`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Everything went out.
    Empty,
    /// The socket is full (wait for POLLOUT).
    Full,
    /// The fd budget (`max_fds`) would be exceeded by the next datagram.
    Budget,
    /// A kernel resource ran out (see [`is_resource`]): try again on the next tick.
    Resource,
}

/// What [`flush_events`] sent.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sent {
    /// Events sent (drained from the queue).
    pub(super) events: usize,
    /// Their fds.
    pub(super) fds: usize,
    /// Their encoded bytes.
    pub(super) bytes: usize,
}

/// Appends postcard's varint of `n` (a `Vec`'s length).
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// One datagram being packed: its bytes, and which queued events (`start..end`) it carries.
struct Packed {
    bytes: Vec<u8>,
    start: usize,
    end: usize,
    fds: usize,
}

/// Packs the queued events from the front into at most `SEND_BATCH` datagrams (each a
/// `ConnBatch`: bounded by `MAX_FRAME` bytes and `MAX_FDS` fds) with at most `max_fds` fds
/// in all.
fn pack(q: &VecDeque<Out>, max_fds: usize) -> Vec<Packed> {
    let mut out: Vec<Packed> = Vec::new();
    let mut total_fds = 0usize;
    let mut i = 0;
    while i < q.len() && out.len() < SEND_BATCH {
        let mut bytes = 0usize;
        let mut fds = 0usize;
        let start = i;
        while let Some(o) = q.get(i) {
            // 1 version byte + up to 5 bytes of count.
            let fits = 6 + bytes + o.bytes.len() <= MAX_FRAME
                && fds + o.fds.len() <= MAX_FDS
                && total_fds + fds + o.fds.len() <= max_fds;
            if !fits {
                break;
            }
            bytes += o.bytes.len();
            fds += o.fds.len();
            i += 1;
        }
        if i == start {
            break; // the next event does not fit the fd budget (each fits a datagram alone)
        }
        let mut d = Vec::with_capacity(6 + bytes);
        d.push(WIRE_VERSION);
        push_varint(&mut d, i - start);
        for o in q.range(start..i) {
            d.extend_from_slice(&o.bytes);
        }
        total_fds += fds;
        out.push(Packed {
            bytes: d,
            start,
            end: i,
            fds,
        });
    }
    out
}

/// Sends queued connection events, packed several to a datagram, until the queue is empty,
/// the socket is full, `max_fds` fds went out, or a kernel resource ran out; the hub's own
/// fds of what was sent are moved to `grave` (to be closed with the batch's others).
/// `Err` only if the peer is gone or the socket failed for another reason.
pub(super) fn flush_events(
    ch: &Channel,
    q: &mut VecDeque<Out>,
    mut max_fds: usize,
    grave: &mut Vec<OwnedFd>,
) -> Result<(Sent, Stop), ChannelError> {
    let mut sent = Sent::default();
    loop {
        if q.is_empty() {
            return Ok((sent, Stop::Empty));
        }
        let packed = pack(q, max_fds);
        if packed.is_empty() {
            return Ok((sent, Stop::Budget));
        }
        let n = {
            let frames: Vec<(&Vec<u8>, Vec<BorrowedFd<'_>>)> = packed
                .iter()
                .map(|p| {
                    let fds = q
                        .range(p.start..p.end)
                        .flat_map(|o| o.fds.iter().map(|f| f.as_fd()))
                        .collect();
                    (&p.bytes, fds)
                })
                .collect();
            match ch.try_send_frames(frames.iter().map(|(b, f)| (*b, f.as_slice()))) {
                Ok(n) => n,
                Err(ChannelError::WouldBlock) => return Ok((sent, Stop::Full)),
                Err(e) if is_resource(&e) => return Ok((sent, Stop::Resource)),
                Err(e) => return Err(e),
            }
        };
        let events = packed.get(..n).and_then(|p| p.last()).map_or(0, |p| p.end);
        let fds: usize = packed.iter().take(n).map(|p| p.fds).sum();
        for o in q.drain(..events.min(q.len())) {
            sent.bytes += o.bytes.len();
            bury_own(o.fds, grave);
        }
        sent.events += events;
        sent.fds += fds;
        max_fds = max_fds.saturating_sub(fds);
        if n < packed.len() {
            return Ok((sent, Stop::Full));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame;
    use crate::hub::protocol::{ConnBatch, ConnEvent, Refusal};

    fn ev(e: &ConnEvent) -> Out {
        Out {
            bytes: encode_event(e).unwrap(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn packed_datagrams_decode_as_batches() {
        let mut q = VecDeque::new();
        let mut want = Vec::new();
        for i in 0..300u32 {
            let e = if i % 3 == 0 {
                ConnEvent::Refused {
                    seq: i,
                    error: Refusal::Busy,
                }
            } else {
                ConnEvent::Accepted { seq: i }
            };
            q.push_back(ev(&e));
            want.push(e);
        }
        let big = ConnEvent::Deliver {
            data: vec![7; MAX_EVENT - 16],
            fds: heapless::Vec::new(),
        };
        q.push_back(ev(&big));
        want.push(big);
        let packed = pack(&q, usize::MAX);
        assert_eq!(
            packed.len(),
            2,
            "300 small events in one, the big one alone"
        );
        let mut got = Vec::new();
        for p in &packed {
            assert!(p.bytes.len() <= MAX_FRAME);
            got.extend(frame::decode::<ConnBatch>(&p.bytes).unwrap());
        }
        assert_eq!(got, want);
    }
}
