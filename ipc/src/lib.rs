//! Bulkhead IPC: the wire layer every control socket uses (frames over SOCK_SEQPACKET with
//! fds by SCM_RIGHTS), and later the capability types and the hub.

pub mod channel;
pub mod frame;

pub use channel::{
    peer_credentials, Channel, ChannelError, ChannelListener, PeerCredentials, RawFrame,
};
pub use frame::{FrameError, MAX_FDS, MAX_FRAME};
