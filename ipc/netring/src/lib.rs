//! bulkhead-netring: the shared memory between an app VM's virtio-net device (in its VMM,
//! `bulkhead-vmm`) and the net VM's `bulkhead-netd`, through which Ethernet frames move
//! without a hub frame per packet.
//!
//! One memfd from the hub's memfd server holds a header page and two single-producer,
//! single-consumer byte rings:
//!
//! ```text
//! 0x000  magic "BHNR", version, data size, the app VM's MAC, negotiated offloads
//! 0x040  control of ring TX (guest → net VM): prod, space_at | cons, kick_at
//! 0x0c0  control of ring RX (net VM → guest): prod, space_at | cons, kick_at
//! 0x1000 ring TX data (data size bytes, a power of two)
//! ....   ring RX data
//! ```
//!
//! Each ring carries records: an 8-byte header (payload length, kind) and the payload,
//! padded to 8 bytes; a record never wraps (a pad record fills the end of the ring first).
//! The payload of a frame record is a `virtio_net_hdr_v1` (12 bytes) and the Ethernet frame.
//!
//! Positions are free-running byte counters. Each side keeps its own position locally and
//! only publishes it: nothing the peer writes can move it. Whatever is read from the peer
//! (its position, a record header) is read once and checked before use; a broken peer gives
//! [`RingError::Corrupt`], never a panic or an access outside the mapping, and the side that
//! sees it drops the connection.
//!
//! Wake-ups follow virtio's event index: a consumer that goes to sleep publishes
//! `kick_at` = its position, and the producer sends one doorbell (a small message over the
//! hub connection) only when it publishes past that point; a producer that finds the ring
//! full publishes `space_at`, and the consumer sends a doorbell when it frees past it. A
//! busy ring therefore costs no doorbells at all.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

mod hello;
mod layout;
mod mem;
mod ring;

pub use hello::{Hello, HELLO_LEN, HELLO_MAGIC};
pub use layout::{
    attach, create, features, ring_len, set_features, RingInfo, DEFAULT_DATA_SIZE, HEADER_SIZE,
    MAX_DATA_SIZE, MAX_PAYLOAD, MIN_DATA_SIZE, RECORD_HEADER, RING_MAGIC, RING_VERSION,
};
pub use mem::{Mapping, Mem};
pub use ring::{need_event, Consumer, Producer, Record, Reservation, Side};

/// What can go wrong with a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The peer wrote something impossible (a position, a record header): the ring cannot
    /// be trusted any more.
    #[error("corrupt ring: {0}")]
    Corrupt(String),
    /// The header does not describe a ring this side can use.
    #[error("bad ring header: {0}")]
    BadHeader(String),
    /// A payload larger than [`MAX_PAYLOAD`].
    #[error("a {0}-byte record is larger than the ring allows ({MAX_PAYLOAD})")]
    TooLarge(usize),
    /// The mapping failed or is too small.
    #[error("{0}")]
    Map(String),
}

/// The doorbell message: any message on the connection after the hello means "look at the
/// rings"; this is the one both sides send.
pub const KICK: &[u8] = b"k";
