//! The hub ⇄ VMM protocol.
//!
//! Two kinds of sockets, both [`crate::Channel`]s (postcard frames over SOCK_SEQPACKET):
//!
//! - the **VM channel**: one per VM, a socketpair end init made and passed to the VMM at
//!   exec (the hub holds the other end, named on its command line). The hub knows which VM
//!   speaks from which channel; no message names its sender. Carries [`VmRequest`] (VMM →
//!   hub) and [`HubEvent`] (hub → VMM).
//! - a **connection socket**: one per connection, made by the hub at connect time. The
//!   client VMM gets its end in [`HubEvent::Connected`], the provider VMM in
//!   [`HubEvent::Accept`] (the faux accept: "add a non-listening socket named `name` with this
//!   fd"). The hub holds the other two ends and relays between them. Carries [`ConnSend`]
//!   (VMM → hub, the fds attached) and [`ConnEvent`] (hub → VMM).

use bulkhead_policy::{FdType, GuestError, Rights};
use serde::{Deserialize, Serialize};

use crate::frame::MAX_FDS;

/// Longest service or VM name on the wire.
pub const MAX_NAME: usize = 64;

/// A connection, numbered by the hub (never reused while the hub runs).
pub type ConnId = u32;

/// A bounded name.
pub type Name = heapless::String<MAX_NAME>;

/// VMM → hub, on the VM channel. `tag` is echoed in the answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRequest {
    /// Register this VM as the provider of `service` (answer: `Provided` or `Refused`).
    Provide {
        /// Echoed.
        tag: u32,
        /// The service.
        service: Name,
    },
    /// Connect to `service` (at `provider`, if the guest named one). Answer: `Connected`
    /// with the connection socket attached, or `Refused`.
    Connect {
        /// Echoed.
        tag: u32,
        /// The service.
        service: Name,
        /// The provider the guest asked for (`wayland@gpu-vm`), if any.
        provider: Option<Name>,
    },
    /// Close a connection this VM is a party to (answer: `Closed` or `Refused`).
    Close {
        /// Echoed.
        tag: u32,
        /// The connection.
        conn: ConnId,
    },
    /// Allocate shared memory from the memfd server, charged to this VM (answer:
    /// `ShmAllocated` with the memfd attached, or `Refused`).
    AllocShm {
        /// Echoed.
        tag: u32,
        /// Bytes asked for (rounded up to a page).
        size: u64,
    },
    /// The VMM (re)started on this channel (init keeps a VM's channel across restarts of
    /// its VMM): the hub forgets the VM's services, connections and handle-table entries, as
    /// if the channel had closed, so a restarted VM starts with nothing (no answer). A VMM
    /// sends it first.
    Hello,
    /// This VM closed its last fd to the object `(dev, ino)` it received from the hub; the
    /// hub forgets the VM's rights on it (no answer).
    Release {
        /// `st_dev`.
        dev: u64,
        /// `st_ino`.
        ino: u64,
    },
}

/// What the guest is told when something is refused. Policy denials are always
/// `PermissionDenied`, whatever the rule, and whether or not the target exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// An id (connection) that is not this VM's, or an fd the VM does not hold a right on.
    InvalidId,
    /// Malformed request: rights wider than held, bad sizes, too many fds, duplicates.
    InvalidArgs,
    /// Not allowed by policy.
    PermissionDenied,
    /// A quota is exhausted.
    OutOfMemory,
    /// A budget is exhausted for now (the receiver's queues, the hub's fds held for a VM, a
    /// provider's event queue): nothing was done; retry later (on a connection, `Ready`
    /// says when there is room again).
    Busy,
}

impl From<GuestError> for Refusal {
    fn from(e: GuestError) -> Refusal {
        match e {
            GuestError::PermissionDenied => Refusal::PermissionDenied,
            GuestError::InvalidArgs => Refusal::InvalidArgs,
        }
    }
}

/// hub → VMM, on the VM channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubEvent {
    /// This VM now provides `service`.
    Provided {
        /// Echoed.
        tag: u32,
    },
    /// Connected; the client's connection socket is attached.
    Connected {
        /// Echoed.
        tag: u32,
        /// The connection.
        conn: ConnId,
    },
    /// Faux accept, to the provider: add a non-listening virtio_wl socket called `name`
    /// (`wl-conn-<conn>`) backed by the attached fd, and announce `name` on the listener of
    /// `service`; the guest's connect to `name` is its accept.
    Accept {
        /// The service.
        service: Name,
        /// The connection.
        conn: ConnId,
        /// The socket name to add.
        name: Name,
    },
    /// A memfd was allocated (attached): sealed against grow/shrink and exec.
    ShmAllocated {
        /// Echoed.
        tag: u32,
        /// The size (page-rounded).
        size: u64,
    },
    /// A connection was closed (by this VM's request, the peer, or the peer VM going away).
    Closed {
        /// Echoed (0 when the hub closed it on its own).
        tag: u32,
        /// The connection.
        conn: ConnId,
    },
    /// A request was refused.
    Refused {
        /// Echoed.
        tag: u32,
        /// Uniform reason.
        error: Refusal,
    },
}

/// Most data bytes in one send (all its parts): the guest's largest `VFD_SEND`.
pub const MAX_SEND: usize = 1 << 20;

/// Most data bytes in one part of a send (a frame leaves room for the header and rights).
pub const PART_DATA: usize = crate::frame::MAX_FRAME - 1024;

/// VMM → hub, on a connection socket: data plus fds (attached by SCM_RIGHTS, in order),
/// with the rights requested for each.
///
/// A send longer than one frame goes as parts `0, 1, 2, …`, each in its own frame, with
/// `more` set on all but the last; only part 0 may carry fds. The hub decides on the whole
/// send when its last part arrives and delivers all of it or nothing; part 0 always starts
/// a new send (a send the VMM gave up on part-way is dropped whole).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnSend {
    /// Named in the verdict: the verdict on a send carries the `seq` of its last part.
    pub seq: u32,
    /// The bytes.
    pub data: Vec<u8>,
    /// Rights requested for each attached fd (same length as the fds).
    pub rights: heapless::Vec<Rights, MAX_FDS>,
    /// This frame's index within its send (0: the first or only part).
    pub part: u16,
    /// More parts of this send follow.
    pub more: bool,
}

/// One fd of a delivery: its type as the hub classified it and the receiver's rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdInfo {
    /// The type.
    pub fd_type: FdType,
    /// Is this pipe end the write end (pipes only).
    pub write_end: bool,
    /// The receiver's rights (map read-only unless WRITE is here).
    pub rights: Rights,
}

/// hub → VMM, on a connection socket. One datagram carries one or more events (a
/// [`ConnBatch`]); the fds of its `Deliver`s are attached in order, at most `MAX_FDS` in
/// all.
// The fd list is bounded in place (heapless) on purpose: a few hundred bytes per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnEvent {
    /// A message (or one part of a longer one) from the peer, its fds attached in order.
    Deliver {
        /// The bytes.
        data: Vec<u8>,
        /// One entry per attached fd.
        fds: heapless::Vec<FdInfo, MAX_FDS>,
    },
    /// The send whose last part was `seq` was refused as a whole; nothing was delivered.
    Refused {
        /// Echoed.
        seq: u32,
        /// Uniform reason.
        error: Refusal,
    },
    /// The send whose last part was `seq` was accepted: all of it is on its way to the peer.
    Accepted {
        /// Echoed.
        seq: u32,
    },
    /// After a `Busy` refusal: there is room again, a retry may go through.
    Ready,
}

/// What one hub → VMM datagram on a connection carries.
pub type ConnBatch = Vec<ConnEvent>;
