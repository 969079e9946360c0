//! Bulkhead IPC: the wire layer every control socket uses (frames over SOCK_SEQPACKET with
//! fds by SCM_RIGHTS), fd classification ([`classify`]) and
//! the hub ([`hub`]): broker, service registry, memfd server, audit, policy reload.
//! See `docs/ipc.md`.

pub mod bench;
pub mod channel;
pub mod classify;
pub mod frame;
#[doc(hidden)]
pub mod fuzz; // the body of ipc/fuzz's target and of tests/fuzz_seeds.rs: a harness, not the hub
pub mod hub;

pub use channel::{
    peer_credentials, Channel, ChannelError, ChannelListener, PeerCredentials, RawFrame,
};
pub use frame::{FrameError, MAX_FDS, MAX_FRAME};
