//! The VMM side of a hub connection socket: what `bulkhead-vmm`'s virtio_wl device uses for
//! the fd it got in `HubEvent::Connected` or `HubEvent::Accept`, or in a delivery (a socket
//! another VM passed, mediated by the hub).
//!
//! Non-blocking on purpose: `try_send` returning `WouldBlock` means the socket toward the hub
//! is full, to be waited on for a bounded time, never inside the device without a bound.
//! Every send gets a verdict from the hub (`Accepted` or `Refused`, named by the `seq` of
//! the send's last part), so the device can answer the guest's `VFD_SEND` with the hub's
//! decision. One datagram from the hub may carry several events; they are kept in order
//! here and handed out one at a time. Received fds come paired with the hub's `FdInfo`
//! (type and the receiver's rights), so the device never has to guess a type.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bulkhead_policy::Rights;

use crate::channel::{Channel, ChannelError};
use crate::frame::MAX_FDS;
use crate::hub::protocol::{
    ConnBatch, ConnEvent, ConnSend, FdInfo, Name, Refusal, MAX_NAME, MAX_SEND, PART_DATA,
};

/// What arrived on a connection.
#[derive(Debug)]
pub enum Incoming {
    /// A message (or one part of a longer one) from the peer VM, each fd with its type and
    /// the rights this VM has.
    Message {
        /// The bytes.
        data: Vec<u8>,
        /// The fds, in order.
        fds: Vec<(OwnedFd, FdInfo)>,
    },
    /// The hub refused the send whose last part was `seq`, as a whole.
    Refused {
        /// The send's last part.
        seq: u32,
        /// Uniform reason.
        error: Refusal,
    },
    /// The hub accepted the send whose last part was `seq`.
    Accepted {
        /// The send's last part.
        seq: u32,
    },
    /// There is room again after a `Busy` refusal.
    Ready,
}

/// Errors of [`HubConn`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The channel failed (`WouldBlock` is back-pressure or "nothing yet").
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// More fds than a frame carries.
    #[error("{0} fds in one send (at most {MAX_FDS})")]
    TooManyFds(usize),
    /// More data than one send carries.
    #[error("{0} bytes in one send (at most {MAX_SEND})")]
    TooLarge(usize),
    /// The hub sent fds and descriptions that do not match (all fds were closed).
    #[error("delivery with {fds} fds but {infos} descriptions")]
    Mismatch {
        /// fds attached.
        fds: usize,
        /// descriptions.
        infos: usize,
    },
    /// A name longer than the protocol allows.
    #[error("name longer than {MAX_NAME} bytes")]
    NameTooLong,
}

/// A protocol name from a string.
pub fn name(s: &str) -> Result<Name, ClientError> {
    Name::try_from(s).map_err(|_| ClientError::NameTooLong)
}

/// A send in progress: its parts go out one by one ([`HubConn::send_next`]), and its
/// verdict names `last_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sending {
    /// The seq of part 0.
    pub first_seq: u32,
    /// The seq the next part will get (after the last: one past it).
    next_seq: u32,
    /// Parts sent so far.
    sent: u16,
    /// Parts in all.
    parts: u16,
}

impl Sending {
    /// Every part went out.
    pub fn done(&self) -> bool {
        self.sent >= self.parts
    }
    /// The seq the verdict will carry (once `done`).
    pub fn last_seq(&self) -> u32 {
        self.first_seq
            .wrapping_add(u32::from(self.parts))
            .wrapping_sub(1)
    }
    /// Is `seq` one of this send's parts sent so far (a verdict for it ends the send)?
    pub fn covers(&self, seq: u32) -> bool {
        seq.wrapping_sub(self.first_seq) < u32::from(self.sent)
    }
}

/// One connection socket, VMM side.
#[derive(Debug)]
pub struct HubConn {
    chan: Channel,
    next_seq: u32,
    /// Events of datagrams already read, not yet handed out.
    buffered: VecDeque<Incoming>,
}

impl HubConn {
    /// Adopts the fd from `Connected`/`Accept` (or a mediated socket from a delivery) and
    /// makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<HubConn, ClientError> {
        let chan = Channel::from_fd(fd);
        chan.set_nonblocking(true)?;
        Ok(HubConn {
            chan,
            next_seq: 1,
            buffered: VecDeque::new(),
        })
    }

    /// Sends `data` (at most one part's worth) with `fds` as a send of its own, each fd with
    /// the rights requested for the receiver. Returns the frame's `seq` (named again in its
    /// verdict). `WouldBlock`: the socket is full, nothing was sent.
    pub fn try_send(
        &mut self,
        data: &[u8],
        fds: &[(BorrowedFd<'_>, Rights)],
    ) -> Result<u32, ClientError> {
        if data.len() > PART_DATA {
            return Err(ClientError::TooLarge(data.len()));
        }
        let mut s = self.begin(data.len())?;
        self.send_next(&mut s, data, fds)?;
        Ok(s.last_seq())
    }

    /// Starts a send of `len` bytes: it goes out as `ceil(len / PART_DATA)` parts (at least
    /// one) with [`HubConn::send_next`].
    pub fn begin(&self, len: usize) -> Result<Sending, ClientError> {
        if len > MAX_SEND {
            return Err(ClientError::TooLarge(len));
        }
        let parts = len.div_ceil(PART_DATA).max(1);
        let parts = u16::try_from(parts).map_err(|_| ClientError::TooLarge(len))?;
        Ok(Sending {
            first_seq: self.next_seq,
            next_seq: self.next_seq,
            sent: 0,
            parts,
        })
    }

    /// Sends the next part of `s` (the part's slice of `data`; `fds` go with part 0 only).
    /// `WouldBlock`: the socket is full and this part was not sent; call again.
    pub fn send_next(
        &mut self,
        s: &mut Sending,
        data: &[u8],
        fds: &[(BorrowedFd<'_>, Rights)],
    ) -> Result<(), ClientError> {
        if fds.len() > MAX_FDS {
            return Err(ClientError::TooManyFds(fds.len()));
        }
        if s.done() {
            return Ok(());
        }
        let start = usize::from(s.sent) * PART_DATA;
        let end = (start + PART_DATA).min(data.len());
        let chunk = data.get(start..end).unwrap_or_default();
        let these: &[(BorrowedFd<'_>, Rights)] = if s.sent == 0 { fds } else { &[] };
        let mut rights = heapless::Vec::new();
        for (_, r) in these {
            rights
                .push(*r)
                .map_err(|_| ClientError::TooManyFds(fds.len()))?;
        }
        let msg = ConnSend {
            seq: s.next_seq,
            data: chunk.to_vec(),
            rights,
            part: s.sent,
            more: s.sent + 1 < s.parts,
        };
        let raw: Vec<BorrowedFd<'_>> = these.iter().map(|(f, _)| *f).collect();
        self.chan.try_send(&msg, &raw)?;
        s.sent += 1;
        s.next_seq = s.next_seq.wrapping_add(1);
        self.next_seq = s.next_seq;
        Ok(())
    }

    /// Reads one datagram from the hub if one is waiting, keeping its events in order.
    /// `WouldBlock` when none is; `Closed` when the hub closed the connection.
    fn fill(&mut self) -> Result<(), ClientError> {
        let (batch, fds) = self.chan.try_recv::<ConnBatch>()?;
        let wanted: usize = batch
            .iter()
            .map(|ev| match ev {
                ConnEvent::Deliver { fds, .. } => fds.len(),
                _ => 0,
            })
            .sum();
        if wanted != fds.len() {
            return Err(ClientError::Mismatch {
                fds: fds.len(),
                infos: wanted,
            });
        }
        let mut fds = fds.into_iter();
        for ev in batch {
            let item = match ev {
                ConnEvent::Deliver { data, fds: infos } => Incoming::Message {
                    data,
                    fds: infos
                        .into_iter()
                        .filter_map(|info| fds.next().map(|fd| (fd, info)))
                        .collect(),
                },
                ConnEvent::Refused { seq, error } => Incoming::Refused { seq, error },
                ConnEvent::Accepted { seq } => Incoming::Accepted { seq },
                ConnEvent::Ready => Incoming::Ready,
            };
            self.buffered.push_back(item);
        }
        Ok(())
    }

    /// The next event, if any (`WouldBlock` when none is queued; `Closed` when the hub
    /// closed the connection).
    pub fn try_recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            if let Some(ev) = self.buffered.pop_front() {
                return Ok(ev);
            }
            self.fill()?;
        }
    }

    /// Reads what the hub sent so far and takes out the verdict on `s` if it came
    /// (`Ok(Some(Ok(())))` accepted, `Ok(Some(Err(e)))` refused), leaving every other event
    /// in order for [`HubConn::try_recv`]; `Ok(None)` while it has not come. A `Ready`
    /// seen on the way is reported by `ready`.
    pub fn take_verdict(
        &mut self,
        s: &Sending,
        ready: &mut bool,
    ) -> Result<Option<Result<(), Refusal>>, ClientError> {
        loop {
            match self.fill() {
                Ok(()) => {}
                Err(ClientError::Channel(ChannelError::WouldBlock)) => break,
                Err(e) => {
                    // What was read before stays; the error is the caller's (EOF, a bad
                    // datagram) once the buffered events are looked at.
                    if let Some(v) = self.find_verdict(s, ready) {
                        return Ok(Some(v));
                    }
                    return Err(e);
                }
            }
        }
        Ok(self.find_verdict(s, ready))
    }

    fn find_verdict(&mut self, s: &Sending, ready: &mut bool) -> Option<Result<(), Refusal>> {
        let mut found = None;
        let mut i = 0;
        while i < self.buffered.len() {
            let hit = match self.buffered.get(i) {
                Some(Incoming::Accepted { seq }) if s.covers(*seq) => Some(Ok(())),
                Some(Incoming::Refused { seq, error }) if s.covers(*seq) => Some(Err(*error)),
                Some(Incoming::Ready) => {
                    *ready = true;
                    self.buffered.remove(i);
                    continue;
                }
                _ => None,
            };
            if let Some(v) = hit {
                self.buffered.remove(i);
                found = Some(v);
                break;
            }
            i += 1;
        }
        found
    }

    /// Reads what the hub sent so far and takes out a `Ready` if one came (other events
    /// stay, in order).
    pub fn take_ready(&mut self) -> Result<bool, ClientError> {
        loop {
            match self.fill() {
                Ok(()) => {}
                Err(ClientError::Channel(ChannelError::WouldBlock)) => break,
                Err(e) => return Err(e),
            }
        }
        match self
            .buffered
            .iter()
            .position(|e| matches!(e, Incoming::Ready))
        {
            Some(i) => {
                self.buffered.remove(i);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Events read from the socket but not yet handed out (the socket may not poll
    /// readable while some wait here).
    pub fn has_buffered(&self) -> bool {
        !self.buffered.is_empty()
    }
}

impl AsFd for HubConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }
}
