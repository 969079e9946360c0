//! virtio_wl ("virtio Wayland"): fd passing between a guest and host sockets (see
//! docs/virtio_wl.md).
//!
//! - `protocol`: the wire format (command parsing, responses, in-queue messages).
//! - `sockets`: the named sockets NEW_CTX_NAMED connects to (`Listening` / `NonListening` /
//!   `Hub`).
//! - `hub`: the VM channel to the hub: names it resolves (`listen:svc`, `svc@vm`), the faux
//!   accept, `Release`.
//! - `vfd`: what a vfd is on the host; the shared-memory window.
//! - `scm`: sendmsg/recvmsg with SCM_RIGHTS.
//! - `limits`: per-VM limits and the send wait.
//! - `state`: the vfd table and what it holds.
//! - `commands`: out-queue commands and their answers (hub sends among them).
//! - `host_reads`: host fds and hub frames into in-queue messages.
//! - `queues`: buffers through the in and out virtqueues.
//! - `device`: the `VirtioDevice` and its worker thread.
mod commands;
pub mod device;
mod host_reads;
pub mod hub;
pub mod limits;
pub mod protocol;
mod queues;
pub mod scm;
pub mod sockets;
pub mod state;
pub mod vfd;
