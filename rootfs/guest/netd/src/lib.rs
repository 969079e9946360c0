//! bulkhead-netd: the program of the net VM (docs/net.md). It provides the virtio_wl
//! service `net`; each app VM's VMM connects, sends a ring memfd (crate `bulkhead-netring`)
//! in its hello, and from then on frames move through the ring with doorbells only when a
//! side sleeps. Each client gets a TAP, an isolated port of a bridge whose other port is the
//! NIC the net VM owns by VFIO; the bridge and ports are set up with Debian's iproute2.
//!
//! - `transport`: connections (virtio_wl's faux accept, or a Unix socket for tests).
//! - `client`: one app VM: hello, ring, TAP, the frames both ways.
//! - `tap`: TAP devices with virtio-net headers and offloads.
//! - `bridge`: the bridge, the uplink, the ports (iproute2).
//! - `server`: the loop.
//! - `carrier`: waiting for an interface's carrier by the clock (`bulkhead-netprobe carrier`).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bridge;
pub mod carrier;
pub mod client;
pub mod server;
pub mod tap;
pub mod transport;
