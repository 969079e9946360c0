//! virtio-net whose backend is the net VM (docs/net.md): the guest's frames move through a
//! pair of shared-memory rings (crate `bulkhead-netring`) in a memfd from the hub's memfd
//! server, which the net VM's `bulkhead-netd` maps too; small doorbell messages over a hub
//! connection to `net@<vm>` wake the other side only when it sleeps.
//!
//! - `header`: the `virtio_net_hdr_v1`, offload features, the checks of both directions.
//! - `tx`: TX chains into the TX ring (every chain checked; malformed ones dropped, counted).
//! - `rx`: RX ring records into the guest's buffers (mergeable buffers, a stash).
//! - `queues`: a pass over each queue, with notification suppression (EVENT_IDX).
//! - `link`: the hub connection and the ring; the thread that (re)connects.
//! - `hub`: the hub, reached through the virtio_wl device's VM channel.
//! - `worker`: the data thread while the guest has the device activated.
//! - `stats`: counters.
//! - `device`: the `VirtioDevice` (config space: MAC, link status, MTU).
//! - `fuzz`: the body of the `net_chains` fuzz target (vmm/fuzz).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod device;
#[doc(hidden)]
pub mod fuzz;
pub mod header;
pub mod hub;
pub mod link;
pub mod queues;
pub mod rx;
pub mod stats;
pub mod tx;
mod worker;

/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
