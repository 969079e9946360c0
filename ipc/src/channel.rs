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
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, sendmsg, socket, socketpair, sockopt,
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::frame::{self, FrameError, MAX_FDS, MAX_FRAME};

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

fn sys(op: &'static str) -> impl FnOnce(Errno) -> ChannelError {
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

/// Identity of the process at the other end of a connected Unix socket (SO_PEERCRED),
/// as the kernel recorded it at `connect(2)`/`socketpair(2)` time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Reads SO_PEERCRED of any connected Unix socket.
pub fn peer_credentials(fd: BorrowedFd<'_>) -> Result<PeerCredentials, ChannelError> {
    let cred = getsockopt(&fd, sockopt::PeerCredentials).map_err(sys("getsockopt(SO_PEERCRED)"))?;
    Ok(PeerCredentials {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
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

        let data_trunc = hdr.msg_flags & libc::MSG_TRUNC != 0;
        let ctrl_trunc = hdr.msg_flags & libc::MSG_CTRUNC != 0;
        if data_trunc || ctrl_trunc || fds.len() > MAX_FDS {
            return Err(ChannelError::Truncated {
                data: data_trunc,
                control: ctrl_trunc || fds.len() > MAX_FDS,
                fds_closed: fds.len(),
            });
        }
        if len == 0 {
            if fds.is_empty() && self.peer_hung_up() {
                return Err(ChannelError::Closed);
            }
            return Err(ChannelError::EmptyFrame {
                fds_closed: fds.len(),
            });
        }
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

/// Room for exactly MAX_FDS fds in one SCM_RIGHTS message: one more makes the kernel set
/// MSG_CTRUNC. 32 words = 256 bytes, far more than CMSG_SPACE(28 * 4) = 128.
const CONTROL_WORDS: usize = 32;

fn control_len() -> usize {
    let fd_bytes = (MAX_FDS * size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    space.min(CONTROL_WORDS * size_of::<u64>())
}

/// Takes ownership of every fd in every SCM_RIGHTS control message of `hdr`.
///
/// # Safety
/// `hdr` must have been filled by a successful `recvmsg(2)`, with its control buffer
/// still alive.
unsafe fn take_rights(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: per the contract, hdr describes a kernel-filled control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points into the control buffer (CMSG_FIRSTHDR /
        // CMSG_NXTHDR only return headers that lie within msg_controllen).
        let c = unsafe { std::ptr::read_unaligned(cmsg) };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: pure arithmetic.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (c.cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
            // SAFETY: cmsg points at a valid header, its data follows it.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..count {
                // SAFETY: the kernel wrote `count` fds after the header (cmsg_len says so),
                // inside the control buffer; read_unaligned copes with any alignment.
                let raw = unsafe {
                    std::ptr::read_unaligned(data.add(i * size_of::<RawFd>()).cast::<RawFd>())
                };
                if raw >= 0 {
                    // SAFETY: the kernel just installed this fd in our table for us; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: hdr and cmsg are valid as above; CMSG_NXTHDR returns null at the end.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    fds
}

/// A listening SOCK_SEQPACKET socket bound to a path (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct ChannelListener {
    fd: OwnedFd,
}

impl ChannelListener {
    /// Binds `path` (an existing socket file there is replaced), sets its mode, listens; the
    /// path appears only once the socket is listening.
    ///
    /// The mode is applied with chmod right after bind; callers that need the socket never
    /// to be reachable with a wider mode should bind inside a directory with tight
    /// permissions, and check `peer_credentials` on every accepted channel anyway.
    pub fn bind(path: &Path, mode: u32) -> Result<ChannelListener, ChannelError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys("socket"))?;
        // Bind under a temporary name and rename into place once listening, so the path
        // never names a socket that refuses connections (clients may start polling for it
        // at once). Paths too long for the extra suffix are bound directly.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".binding");
        let tmp = std::path::PathBuf::from(tmp);
        let staged = tmp.as_os_str().len() < 100;
        let bind_path: &Path = if staged { &tmp } else { path };
        if staged {
            if let Ok(meta) = std::fs::symlink_metadata(&tmp) {
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
        let addr = UnixAddr::new(bind_path.as_os_str().as_bytes()).map_err(sys("socket path"))?;
        bind(fd.as_raw_fd(), &addr).map_err(sys("bind"))?;
        let io_err = |op: &'static str| {
            move |e: std::io::Error| ChannelError::Sys {
                op,
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        let finish = || -> Result<(), ChannelError> {
            std::fs::set_permissions(bind_path, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod socket"))?;
            listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN)).map_err(sys("listen"))?;
            if staged {
                std::fs::rename(bind_path, path).map_err(io_err("rename socket into place"))?;
            }
            Ok(())
        };
        if let Err(e) = finish() {
            if staged {
                let _ = std::fs::remove_file(bind_path);
            }
            return Err(e);
        }
        Ok(ChannelListener { fd })
    }

    /// Accepts one connection; `WouldBlock` when none is pending. The channel is blocking
    /// and close-on-exec; use the `try_*` calls from a poll loop.
    pub fn accept(&self) -> Result<Channel, ChannelError> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(sys("accept4"))?;
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Channel { fd })
    }
}

impl AsFd for ChannelListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
