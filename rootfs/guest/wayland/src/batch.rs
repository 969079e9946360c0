//! Batches of messages with fds: at most 28 fds per send (virtio_wl's limit per message and
//! libwayland's per read), split only at message boundaries, every fd sent with (or before)
//! the bytes of the message that carries it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::transport::{Channel, MAX_FDS};

/// A message to send on, with its fds.
#[derive(Debug)]
pub struct Out {
    /// The bytes of one message.
    pub bytes: Vec<u8>,
    /// Its fds, in order.
    pub fds: Vec<OwnedFd>,
}

/// A message and its fds, queued.
pub struct Queued {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// Most bytes gathered into one send.
pub const MAX_BATCH_BYTES: usize = 16 * 1024;

/// The groups of `msgs` (as index ranges) that go in one send each: at most 28 fds and
/// about [`MAX_BATCH_BYTES`] bytes (a single larger message goes alone).
pub fn split(msgs: &[(usize, usize)]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let (mut bytes, mut fds) = (0usize, 0usize);
    for (i, &(len, nfd)) in msgs.iter().enumerate() {
        if i > start && (fds + nfd > MAX_FDS || bytes + len > MAX_BATCH_BYTES) {
            out.push(start..i);
            start = i;
            bytes = 0;
            fds = 0;
        }
        bytes += len;
        fds += nfd;
    }
    if start < msgs.len() {
        out.push(start..msgs.len());
    }
    out
}

/// Sends messages over a channel (blocking), batched.
pub fn send_all(ch: &dyn Channel, msgs: Vec<Out>) -> std::io::Result<()> {
    let shape: Vec<(usize, usize)> = msgs.iter().map(|m| (m.bytes.len(), m.fds.len())).collect();
    for r in split(&shape) {
        let group = msgs.get(r).unwrap_or_default();
        let data: Vec<u8> = group.iter().flat_map(|m| m.bytes.iter().copied()).collect();
        let fds: Vec<BorrowedFd<'_>> = group
            .iter()
            .flat_map(|m| m.fds.iter().map(|f| f.as_fd()))
            .collect();
        ch.send(&data, &fds)?;
    }
    Ok(())
}

/// Messages waiting for a non-blocking socket (the client), sent in batches as it takes
/// them. A partial send keeps its place; fds already sent are not sent again.
#[derive(Default)]
pub struct OutQueue {
    msgs: VecDeque<Queued>,
    /// Bytes of the front message already sent.
    sent: usize,
    bytes: usize,
}

impl OutQueue {
    /// Queues a message.
    pub fn push(&mut self, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        self.bytes += bytes.len();
        self.msgs.push_back(Queued { bytes, fds });
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Sends as much as the socket takes without waiting.
    pub fn flush(&mut self, sock: BorrowedFd<'_>) -> std::io::Result<()> {
        while !self.msgs.is_empty() {
            let mut data = Vec::new();
            let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
            let mut count = 0;
            for (i, m) in self.msgs.iter().enumerate() {
                let start = if i == 0 { self.sent } else { 0 };
                if i > 0
                    && (fds.len() + m.fds.len() > MAX_FDS
                        || data.len() + m.bytes.len() > MAX_BATCH_BYTES)
                {
                    break;
                }
                data.extend_from_slice(m.bytes.get(start..).unwrap_or_default());
                fds.extend(m.fds.iter().map(|f| f.as_fd()));
                count = i + 1;
            }
            let n = match crate::sock::send_with_fds(sock, &data, &fds, true) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            drop(fds);
            // Every fd of the batch went with its first byte.
            for m in self.msgs.iter_mut().take(count) {
                m.fds.clear();
            }
            let mut n = n;
            while n > 0 {
                let Some(front) = self.msgs.front() else {
                    break;
                };
                let left = front.bytes.len() - self.sent;
                if n >= left {
                    n -= left;
                    self.bytes -= front.bytes.len();
                    self.msgs.pop_front();
                    self.sent = 0;
                } else {
                    self.sent += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_at_message_boundaries_with_at_most_28_fds() {
        // 10 messages of 3 fds: 9 fit (27), the 10th starts a new batch.
        let msgs = vec![(12usize, 3usize); 10];
        assert_eq!(split(&msgs), vec![0..9, 9..10]);
        // 29 messages of one fd each: 28 + 1.
        let msgs = vec![(16usize, 1usize); 29];
        assert_eq!(split(&msgs), vec![0..28, 28..29]);
        // Bytes bound too; a huge message goes alone.
        let msgs = vec![(10_000usize, 0usize), (10_000, 0), (70_000, 0), (8, 0)];
        assert_eq!(split(&msgs), vec![0..1, 1..2, 2..3, 3..4]);
        assert!(split(&[]).is_empty());
    }
}
