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
//! - `state`: the vfd table, command handling, reading host fds, the queues.
//! - `device`: the `VirtioDevice` and its worker thread.
pub mod device;
pub mod hub;
pub mod protocol;
pub mod scm;
pub mod sockets;
pub mod state;
pub mod vfd;
