//! virtio_wl ("virtio Wayland"): fd passing between a guest and host sockets (see
//! docs/virtio_wl.md).
//!
//! - `protocol`: the wire format (command parsing, responses, in-queue messages).
pub mod protocol;
