//! `Channel`: frames (see [`crate::frame`]) over an AF_UNIX SOCK_SEQPACKET socket, with fds
//! passed by SCM_RIGHTS.
//!
//! Ownership rules, which make leaks impossible from safe code:
//! - `send` takes `&[BorrowedFd]`: the caller keeps its fds, the kernel dups them into the
//!   message, and a closed or foreign fd cannot be named.
//! - every fd that arrives is wrapped in an `OwnedFd` before anything else happens, so an
//!   error path (truncation, a bad frame, too many fds) closes them by dropping them.
//! - received fds carry `FD_CLOEXEC` (`MSG_CMSG_CLOEXEC`).
//!
//! Datagrams are read with `recvmsg(2)`, so every datagram, even a zero-length one, is
//! consumed by exactly one receive call; a bad datagram never stays at the head of the queue.

use std::ffi::c_void;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    connect, sendmsg, socket, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::frame::{self, FrameError, MAX_FDS, MAX_FRAME};

mod batch;
mod cmsg;
mod fds;
mod listener;
mod peer;

pub use batch::*;
use cmsg::*;
pub use fds::close_fds;
pub use listener::ChannelListener;
pub use peer::{check_server, peer_credentials, PeerCredentials, TrustedServer};

/// Errors from sending or receiving on a [`Channel`].
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Encoding, decoding or a bound (size, fd count) failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A non-blocking call found nothing to read, or no room to write.
    #[error("operation would block")]
    WouldBlock,
    /// The peer closed its end.
    #[error("peer closed the channel")]
    Closed,
    /// A zero-length datagram arrived; it was consumed, and any fds it carried were closed.
    #[error("zero-length datagram received ({fds_closed} attached fds closed)")]
    EmptyFrame {
        /// How many fds came with it (all closed).
        fds_closed: usize,
    },
    /// The datagram or its fds did not fit (MSG_TRUNC / MSG_CTRUNC): the whole frame is
    /// rejected and every fd that did arrive was closed.
    #[error(
        "truncated frame (data truncated: {data}, fds truncated: {control}; {fds_closed} fds closed); \
         limits are {MAX_FRAME} bytes and {MAX_FDS} fds"
    )]
    Truncated {
        /// The datagram was longer than `MAX_FRAME`.
        data: bool,
        /// More fds were attached than fit in the control buffer (`MAX_FDS`).
        control: bool,
        /// How many fds arrived and were closed.
        fds_closed: usize,
    },
    /// The process answering on a control socket is not one the client may trust.
    #[error("untrusted server: {0}")]
    UntrustedServer(String),
    /// A system call failed.
    #[error("{op}: {errno}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        errno: Errno,
    },
}

pub(super) fn sys(op: &'static str) -> impl FnOnce(Errno) -> ChannelError {
    move |errno| match errno {
        Errno::EAGAIN => ChannelError::WouldBlock,
        Errno::EPIPE | Errno::ECONNRESET => ChannelError::Closed,
        errno => ChannelError::Sys { op, errno },
    }
}

/// One received datagram before decoding: its bytes and the fds it carried.
#[derive(Debug)]
pub struct RawFrame {
    /// The datagram's bytes (at most `MAX_FRAME`, never empty).
    pub bytes: Vec<u8>,
    /// The fds, owned: dropping the frame closes them.
    pub fds: Vec<OwnedFd>,
}

/// A connected SOCK_SEQPACKET socket that speaks frames.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// Wraps a connected AF_UNIX SOCK_SEQPACKET socket (for example one inherited at exec).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    /// Gives the socket back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A connected pair (both ends close-on-exec, blocking).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("socketpair"))?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Connects to a listening SOCK_SEQPACKET socket at `path` (blocking, close-on-exec).
    pub fn connect(path: &Path) -> Result<Channel, ChannelError> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(sys("socket"))?;
        let addr = UnixAddr::new(path).map_err(sys("socket path"))?;
        connect(fd.as_raw_fd(), &addr).map_err(sys("connect"))?;
        Ok(Channel { fd })
    }

    /// SO_PEERCRED of the other end.
    pub fn peer_credentials(&self) -> Result<PeerCredentials, ChannelError> {
        peer_credentials(self.fd.as_fd())
    }

    /// Connects to a control socket and checks who answers there (SO_PEERCRED) before
    /// anything is sent or read.
    pub fn connect_trusted(path: &Path, trust: TrustedServer) -> Result<Channel, ChannelError> {
        let ch = Channel::connect(path)?;
        check_server(ch.fd.as_fd(), path, trust)?;
        Ok(ch)
    }

    /// Sets or clears O_NONBLOCK on the socket (affects `send`/`recv`; the `try_*` calls
    /// never block either way).
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<(), ChannelError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = fcntl(&self.fd, FcntlArg::F_GETFL).map_err(sys("fcntl(F_GETFL)"))?;
        let mut flags = OFlag::from_bits_retain(flags);
        flags.set(OFlag::O_NONBLOCK, nonblocking);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags)).map_err(sys("fcntl(F_SETFL)"))?;
        Ok(())
    }

    /// Sends one message with `fds` attached, waiting for room if the peer's queue is full.
    pub fn send<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        self.send_with(msg, fds, MsgFlags::empty())
    }

    /// Like `send`, but returns `WouldBlock` instead of waiting when the peer's queue is full
    /// (a peer that never reads cannot stall the sender).
    pub fn try_send<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        self.send_with(msg, fds, MsgFlags::MSG_DONTWAIT)
    }

    fn send_with<T: Serialize + ?Sized>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<(), ChannelError> {
        frame::check_fd_count(fds.len())?;
        let bytes = frame::encode(msg)?;
        self.send_raw(&bytes, fds, flags)
    }

    /// Sends already-encoded bytes. Bounds are still checked; used by forwarders that relay
    /// a frame without decoding it.
    pub fn send_raw(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<(), ChannelError> {
        frame::check_fd_count(fds.len())?;
        if bytes.is_empty() {
            return Err(FrameError::Empty.into());
        }
        if bytes.len() > MAX_FRAME {
            return Err(FrameError::TooLarge { limit: MAX_FRAME }.into());
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let iov = [IoSlice::new(bytes)];
        let sent = sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            flags | MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(sys("sendmsg"))?;
        if sent != bytes.len() {
            // SOCK_SEQPACKET sends are atomic; anything else is a kernel contract violation.
            return Err(ChannelError::Sys {
                op: "sendmsg (short write)",
                errno: Errno::EMSGSIZE,
            });
        }
        Ok(())
    }

    /// Receives and decodes one message, waiting for one if none is queued.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let raw = self.recv_frame()?;
        let msg = frame::decode(&raw.bytes)?;
        Ok((msg, raw.fds))
    }

    /// Like `recv`, but returns `WouldBlock` at once when nothing is queued.
    pub fn try_recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let raw = self.try_recv_frame()?;
        let msg = frame::decode(&raw.bytes)?;
        Ok((msg, raw.fds))
    }

    /// Receives one datagram without decoding it (blocking).
    pub fn recv_frame(&self) -> Result<RawFrame, ChannelError> {
        self.recv_frame_with(0)
    }

    /// Receives one datagram without decoding it (non-blocking).
    pub fn try_recv_frame(&self) -> Result<RawFrame, ChannelError> {
        self.recv_frame_with(libc::MSG_DONTWAIT)
    }

    fn recv_frame_with(&self, flags: libc::c_int) -> Result<RawFrame, ChannelError> {
        // One byte more than MAX_FRAME is not needed: MSG_TRUNC reports any excess.
        // Uninitialised capacity: the kernel writes the datagram, and only the bytes it
        // wrote become part of the Vec (no per-message memset of MAX_FRAME bytes).
        let mut bytes: Vec<u8> = Vec::with_capacity(MAX_FRAME);
        // u64 storage keeps the control buffer aligned for cmsghdr.
        let mut control = [0u64; CONTROL_WORDS];
        let mut iov = [libc::iovec {
            iov_base: bytes.as_mut_ptr().cast::<c_void>(),
            iov_len: MAX_FRAME,
        }];

        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = iov.as_mut_ptr();
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast::<c_void>();
        hdr.msg_controllen = control_len();

        // SAFETY: hdr points at live buffers (iov → the capacity of `bytes`, MAX_FRAME
        // bytes; control → `control`) whose lengths are given in hdr; the kernel writes at
        // most those lengths.
        let n = unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut hdr,
                flags | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n < 0 {
            return Err(sys("recvmsg")(Errno::last()));
        }
        // Own every fd that arrived before looking at anything else.
        // SAFETY: hdr was filled by a successful recvmsg on the buffers above.
        let fds = unsafe { take_rights(&hdr) };
        let len = usize::try_from(n).unwrap_or(0);
        let fds = check_datagram(len, hdr.msg_flags, fds, || self.peer_hung_up())?;
        // SAFETY: recvmsg initialised the first `len` bytes of the capacity (len ≤
        // MAX_FRAME = the capacity; MSG_TRUNC was ruled out above).
        unsafe { bytes.set_len(len.min(MAX_FRAME)) };
        Ok(RawFrame { bytes, fds })
    }

    /// After a zero-byte read: has the peer gone (EOF) rather than sent an empty datagram?
    fn peer_hung_up(&self) -> bool {
        // Raw poll(2): nix's PollFlags does not know POLLRDHUP and would drop the revents.
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
