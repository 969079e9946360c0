//! The VMM side of a hub connection socket: what `bulkhead-vmm`'s virtio_wl device uses for
//! the fd it got in `HubEvent::Connected` or `HubEvent::Accept`.
//!
//! Non-blocking on purpose: `try_send` returning `WouldBlock` is the hub's back-pressure
//! (the receiver is not draining), to be turned into "try again" for the guest, never a
//! wait inside the device. Received fds come paired with the hub's `FdInfo` (type and the
//! receiver's rights), so the device never has to guess a type.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bulkhead_policy::Rights;

use crate::channel::{Channel, ChannelError};
use crate::frame::MAX_FDS;
use crate::hub::protocol::{ConnEvent, ConnSend, FdInfo, Name, Refusal, MAX_NAME};

/// What arrived on a connection.
#[derive(Debug)]
pub enum Incoming {
    /// A message from the peer VM, each fd with its type and the rights this VM has.
    Message {
        /// The bytes.
        data: Vec<u8>,
        /// The fds, in order.
        fds: Vec<(OwnedFd, FdInfo)>,
    },
    /// The hub rejected frame `seq` as a whole.
    Refused {
        /// The frame.
        seq: u32,
        /// Uniform reason.
        error: Refusal,
    },
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

/// One connection socket, VMM side.
#[derive(Debug)]
pub struct HubConn {
    chan: Channel,
    next_seq: u32,
}

impl HubConn {
    /// Adopts the fd from `Connected`/`Accept` and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<HubConn, ClientError> {
        let chan = Channel::from_fd(fd);
        chan.set_nonblocking(true)?;
        Ok(HubConn { chan, next_seq: 1 })
    }

    /// Sends `data` with `fds`, each with the rights requested for the receiver. Returns the
    /// frame's sequence number (named again in a refusal). `WouldBlock`: back-pressure.
    pub fn try_send(
        &mut self,
        data: &[u8],
        fds: &[(BorrowedFd<'_>, Rights)],
    ) -> Result<u32, ClientError> {
        if fds.len() > MAX_FDS {
            return Err(ClientError::TooManyFds(fds.len()));
        }
        let mut rights = heapless::Vec::new();
        for (_, r) in fds {
            rights
                .push(*r)
                .map_err(|_| ClientError::TooManyFds(fds.len()))?;
        }
        let seq = self.next_seq;
        let msg = ConnSend {
            seq,
            data: data.to_vec(),
            rights,
        };
        let raw: Vec<BorrowedFd<'_>> = fds.iter().map(|(f, _)| *f).collect();
        self.chan.try_send(&msg, &raw)?;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(seq)
    }

    /// The next event, if any (`WouldBlock` when none is queued; `Closed` when the hub
    /// closed the connection).
    pub fn try_recv(&self) -> Result<Incoming, ClientError> {
        let (ev, fds) = self.chan.try_recv::<ConnEvent>()?;
        match ev {
            ConnEvent::Deliver { data, fds: infos } => {
                if infos.len() != fds.len() {
                    return Err(ClientError::Mismatch {
                        fds: fds.len(),
                        infos: infos.len(),
                    });
                }
                Ok(Incoming::Message {
                    data,
                    fds: fds.into_iter().zip(infos).collect(),
                })
            }
            ConnEvent::Refused { seq, error } => Ok(Incoming::Refused { seq, error }),
        }
    }
}

impl AsFd for HubConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.chan.as_fd()
    }
}
