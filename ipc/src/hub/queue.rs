//! The hub's outbound queues: frames (bytes plus the fds that go with them) waiting for a
//! VMM to take them, and the `sendmmsg` flush that hands them over.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::channel::{close_fds, Channel, ChannelError, SEND_BATCH};

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

pub(super) type Queued = (Vec<u8>, Vec<OutFd>);

/// Sends queued frames, `SEND_BATCH` per `sendmmsg`, until the queue is empty or the socket
/// is full; `Err` if the peer is gone. The hub's own fds of the frames sent are closed before
/// it returns (`close_fds`).
pub(super) fn flush(ch: &Channel, q: &mut VecDeque<Queued>) -> Result<(), ChannelError> {
    let mut sent_fds = Vec::new();
    let r = flush_into(ch, q, &mut sent_fds);
    close_fds(&mut sent_fds);
    r
}

pub(super) fn flush_into(
    ch: &Channel,
    q: &mut VecDeque<Queued>,
    grave: &mut Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    while !q.is_empty() {
        let asked = q.len().min(SEND_BATCH);
        match ch.try_send_frames(q.iter().map(|(bytes, fds)| (bytes, fds.as_slice()))) {
            Ok(n) => {
                for (_, fds) in q.drain(..n.min(q.len())) {
                    grave.extend(fds.into_iter().filter_map(|f| match f {
                        OutFd::Own(f) => Some(f),
                        OutFd::Shared(_) => None,
                    }));
                }
                if n < asked {
                    // The socket filled up (POLLOUT resumes), or the next frame fails and
                    // the next flush reports it.
                    return Ok(());
                }
            }
            Err(ChannelError::WouldBlock) => return Ok(()),
            Err(e) => {
                q.clear();
                return Err(e);
            }
        }
    }
    Ok(())
}
