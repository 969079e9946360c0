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

/// Which server a control client trusts (checked with SO_PEERCRED before it reads an
/// answer). Root and the client's own uid are always trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedServer {
    /// Only root (init's control socket).
    Root,
    /// Also the owner of the directory the socket is in, if that directory is writable by
    /// its owner alone: only that user could have put the socket there (the hub's runtime
    /// directory, a VMM's).
    DirOwner,
}

/// Checks the credentials of the process at the other end of `fd`, connected to `path`.
pub fn check_server(
    fd: BorrowedFd<'_>,
    path: &Path,
    trust: TrustedServer,
) -> Result<PeerCredentials, ChannelError> {
    use std::os::unix::fs::MetadataExt;
    let cred = peer_credentials(fd)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid == 0 || cred.uid == me {
        return Ok(cred);
    }
    if trust == TrustedServer::DirOwner {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let meta = std::fs::metadata(dir)
            .map_err(|e| ChannelError::UntrustedServer(format!("{}: {e}", dir.display())))?;
        if meta.mode() & 0o022 == 0 && meta.uid() == cred.uid {
            return Ok(cred);
        }
    }
    Err(ChannelError::UntrustedServer(format!(
        "{} is answered by uid {} (pid {}), which is neither root, you, nor the owner of a \
         directory only its owner can write",
        path.display(),
        cred.uid,
        cred.pid
    )))
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

/// Datagrams one [`Channel::try_recv_frames`] call takes at most (one `recvmmsg(2)`).
pub const RECV_BATCH: usize = 32;

/// Datagrams one [`Channel::try_send_frames`] call sends at most (one `sendmmsg(2)`).
pub const SEND_BATCH: usize = 32;

/// Reusable receive buffers for [`Channel::try_recv_frames`]: `RECV_BATCH` data slots of
/// `MAX_FRAME` bytes and one control buffer per slot (so every datagram's SCM_RIGHTS fds are
/// kept apart). Allocated once; the data slots are never zeroed (the kernel writes them, and
/// only the bytes it wrote are read).
pub struct RecvBatch {
    data: Vec<u8>,
    control: Vec<[u64; CONTROL_WORDS]>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").finish_non_exhaustive()
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch::new()
    }
}

impl RecvBatch {
    /// Buffers for `RECV_BATCH` datagrams.
    pub fn new() -> RecvBatch {
        RecvBatch {
            data: Vec::with_capacity(RECV_BATCH * MAX_FRAME),
            control: vec![[0u64; CONTROL_WORDS]; RECV_BATCH],
        }
    }
}

impl Channel {
    /// Receives up to `max` (at most [`RECV_BATCH`]) datagrams with one non-blocking
    /// `recvmmsg(2)` and appends one outcome per datagram to `out`, in order: the frame, or
    /// the same error [`Channel::try_recv`] would give for that datagram alone (`Truncated`,
    /// `EmptyFrame`, `Closed`). Every fd of every datagram is owned before any datagram is
    /// looked at, and each datagram's fds stay with that datagram (one control buffer each);
    /// a bad datagram closes only its own fds.
    ///
    /// `Err(WouldBlock)` when nothing is queued; `Err(Closed)`/`Err(Sys)` when the first
    /// receive fails. After a `Closed` outcome nothing more is appended.
    pub fn try_recv_frames(
        &self,
        batch: &mut RecvBatch,
        max: usize,
        out: &mut Vec<Result<RawFrame, ChannelError>>,
    ) -> Result<(), ChannelError> {
        let max = max.clamp(1, RECV_BATCH);
        let base = batch.data.as_mut_ptr();
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; RECV_BATCH];
        for (i, iov) in iovs.iter_mut().enumerate().take(max) {
            // SAFETY: `data` has capacity RECV_BATCH * MAX_FRAME; slot i starts inside it.
            iov.iov_base = unsafe { base.add(i * MAX_FRAME) }.cast::<c_void>();
            iov.iov_len = MAX_FRAME;
        }
        // SAFETY: mmsghdr is a plain C struct for which all-zero is a valid value.
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        let iov_base = iovs.as_mut_ptr();
        for (i, (h, ctl)) in hdrs
            .iter_mut()
            .zip(batch.control.iter_mut())
            .enumerate()
            .take(max)
        {
            // SAFETY: i < max ≤ RECV_BATCH = iovs.len().
            h.msg_hdr.msg_iov = unsafe { iov_base.add(i) };
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = ctl.as_mut_ptr().cast::<c_void>();
            h.msg_hdr.msg_controllen = control_len();
        }
        let vlen = libc::c_uint::try_from(max).unwrap_or(1);
        // SAFETY: hdrs[..max] point at live buffers: iovecs into the capacity of
        // `batch.data` (MAX_FRAME bytes each, disjoint) and one control buffer each of at
        // least control_len() bytes; the kernel writes at most those lengths. No timeout.
        let n = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(sys("recvmmsg")(Errno::last()));
        }
        let n = usize::try_from(n).unwrap_or(0).min(max);
        // Own every fd of every datagram before looking at anything else.
        let mut fds: [Vec<OwnedFd>; RECV_BATCH] = std::array::from_fn(|_| Vec::new());
        for (h, slot) in hdrs.iter().zip(fds.iter_mut()).take(n) {
            // SAFETY: the kernel filled hdrs[..n] (a successful recvmmsg) and their control
            // buffers are still alive.
            *slot = unsafe { take_rights(&h.msg_hdr) };
        }
        for (i, (h, fds)) in hdrs.iter().zip(fds).enumerate().take(n) {
            let len = usize::try_from(h.msg_len).unwrap_or(0);
            let flags = h.msg_hdr.msg_flags;
            let outcome = check_datagram(len, flags, fds, || self.peer_hung_up()).map(|fds| {
                // SAFETY: the kernel wrote `len` ≤ MAX_FRAME bytes (MSG_TRUNC was ruled out)
                // at the start of slot i, inside the capacity of `batch.data`.
                let bytes =
                    unsafe { std::slice::from_raw_parts(base.add(i * MAX_FRAME), len) }.to_vec();
                RawFrame { bytes, fds }
            });
            let closed = matches!(outcome, Err(ChannelError::Closed));
            out.push(outcome);
            if closed {
                break;
            }
        }
        Ok(())
    }

    /// Sends the first frames of `frames` (at most [`SEND_BATCH`]) with one non-blocking
    /// `sendmmsg(2)`, each with its own fds in its own SCM_RIGHTS message, and returns how
    /// many went (the caller keeps its fds, as with `send`). Bounds are checked per frame;
    /// sending stops before the first frame out of bounds (an error if it is the first).
    /// `Err(WouldBlock)` if the peer's queue has no room for the first.
    pub fn try_send_frames<'a, B, F, I>(&self, frames: I) -> Result<usize, ChannelError>
    where
        B: AsRef<[u8]> + 'a,
        F: AsFd + 'a,
        I: IntoIterator<Item = (&'a B, &'a [F])>,
    {
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        let mut control = [[0u64; CONTROL_WORDS]; SEND_BATCH];
        let mut ctl_lens = [0usize; SEND_BATCH];
        let mut count = 0;
        for ((bytes, fds), (iov, (ctl, ctl_len))) in frames.into_iter().zip(
            iovs.iter_mut()
                .zip(control.iter_mut().zip(ctl_lens.iter_mut())),
        ) {
            let bytes = bytes.as_ref();
            let bad = if bytes.is_empty() {
                Some(FrameError::Empty)
            } else if bytes.len() > MAX_FRAME {
                Some(FrameError::TooLarge { limit: MAX_FRAME })
            } else {
                frame::check_fd_count(fds.len()).err()
            };
            if let Some(e) = bad {
                if count == 0 {
                    return Err(e.into());
                }
                break;
            }
            // A frame whose fds cannot be written is not sent at all (never without them).
            let Some(len) = write_rights(ctl, fds) else {
                if count == 0 {
                    return Err(FrameError::TooManyFds {
                        count: fds.len(),
                        limit: MAX_FDS,
                    }
                    .into());
                }
                break;
            };
            iov.iov_base = bytes.as_ptr().cast_mut().cast::<c_void>();
            iov.iov_len = bytes.len();
            *ctl_len = len;
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        // SAFETY: mmsghdr is a plain C struct for which all-zero is a valid value.
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        let iov_base = iovs.as_mut_ptr();
        for (i, (h, (ctl, len))) in hdrs
            .iter_mut()
            .zip(control.iter_mut().zip(ctl_lens))
            .enumerate()
            .take(count)
        {
            // SAFETY: i < count ≤ SEND_BATCH = iovs.len().
            h.msg_hdr.msg_iov = unsafe { iov_base.add(i) };
            h.msg_hdr.msg_iovlen = 1;
            if len > 0 {
                h.msg_hdr.msg_control = ctl.as_mut_ptr().cast::<c_void>();
                h.msg_hdr.msg_controllen = len;
            }
        }
        let vlen = libc::c_uint::try_from(count).unwrap_or(1);
        // SAFETY: hdrs[..count] point at live iovecs (each over a borrowed frame's bytes,
        // which outlive this call) and at control buffers holding one well-formed
        // SCM_RIGHTS message of borrowed, open fds; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                hdrs.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(sys("sendmmsg")(Errno::last()));
        }
        let n = usize::try_from(n).unwrap_or(0).min(count);
        for (h, iov) in hdrs.iter().zip(iovs.iter()).take(n) {
            if usize::try_from(h.msg_len).ok() != Some(iov.iov_len) {
                // SOCK_SEQPACKET sends are atomic; anything else is a kernel contract violation.
                return Err(ChannelError::Sys {
                    op: "sendmmsg (short write)",
                    errno: Errno::EMSGSIZE,
                });
            }
        }
        Ok(n)
    }
}

/// The checks `recv_frame_with` makes on one received datagram (`len` bytes, `flags` from
/// its msghdr, its fds already owned): truncation, the fd bound, empty datagrams and EOF.
fn check_datagram(
    len: usize,
    flags: libc::c_int,
    fds: Vec<OwnedFd>,
    peer_hung_up: impl FnOnce() -> bool,
) -> Result<Vec<OwnedFd>, ChannelError> {
    let data_trunc = flags & libc::MSG_TRUNC != 0;
    let ctrl_trunc = flags & libc::MSG_CTRUNC != 0;
    if data_trunc || ctrl_trunc || fds.len() > MAX_FDS {
        return Err(ChannelError::Truncated {
            data: data_trunc,
            control: ctrl_trunc || fds.len() > MAX_FDS,
            fds_closed: fds.len(),
        });
    }
    if len == 0 {
        if fds.is_empty() && peer_hung_up() {
            return Err(ChannelError::Closed);
        }
        return Err(ChannelError::EmptyFrame {
            fds_closed: fds.len(),
        });
    }
    Ok(fds)
}

/// Writes one SCM_RIGHTS message carrying `fds` into `ctl`; returns the msg_controllen to
/// use (0 when there are no fds), or `None` if they cannot be written (more than MAX_FDS;
/// the caller checks that first, so the message fits: CMSG_SPACE(28 * 4) = 128 bytes ≤ 256).
fn write_rights<F: AsFd>(ctl: &mut [u64; CONTROL_WORDS], fds: &[F]) -> Option<usize> {
    if fds.is_empty() {
        return Some(0);
    }
    if fds.len() > MAX_FDS {
        return None;
    }
    let bytes = (fds.len() * size_of::<RawFd>()) as libc::c_uint;
    // SAFETY: pure arithmetic.
    let (space, len) = unsafe { (libc::CMSG_SPACE(bytes), libc::CMSG_LEN(bytes)) };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_control = ctl.as_mut_ptr().cast::<c_void>();
    hdr.msg_controllen = space as usize;
    // SAFETY: hdr describes `ctl`, which holds at least `space` bytes (see above), so
    // CMSG_FIRSTHDR returns a header inside it.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
    if cmsg.is_null() {
        return None;
    }
    // SAFETY: cmsg points at the start of `ctl` (8-byte aligned, room for the header and
    // `bytes` of data); the fds are written unaligned-safe right after the header.
    unsafe {
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as usize;
        let data = libc::CMSG_DATA(cmsg);
        for (i, fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(
                data.add(i * size_of::<RawFd>()).cast::<RawFd>(),
                fd.as_fd().as_raw_fd(),
            );
        }
    }
    Some(space as usize)
}

/// Closes every fd in `fds` (emptying it) with as few system calls as possible: each run of
/// consecutive fd numbers, two or more long, goes with one `close_range(2)`; the rest with
/// `close(2)`. Only the exact numbers held here are closed: a run is used only when every
/// number from its first to its last is one of these owned fds, so no other fd of the
/// process can be in the range. If `close_range` fails (an old kernel), the run is closed
/// one by one.
pub fn close_fds(fds: &mut Vec<OwnedFd>) {
    if fds.len() < 2 {
        fds.clear();
        return;
    }
    fds.sort_unstable_by_key(|f| f.as_raw_fd());
    let mut rest = std::mem::take(fds).into_iter().peekable();
    while let Some(first) = rest.next() {
        let lo = first.as_raw_fd();
        let mut run = vec![first];
        while let Some(next) = rest.next_if(|f| {
            run.last()
                .is_some_and(|l| l.as_raw_fd().checked_add(1) == Some(f.as_raw_fd()))
        }) {
            run.push(next);
        }
        if run.len() < 2 {
            continue; // dropped: close(2)
        }
        let hi = lo.saturating_add(i32::try_from(run.len() - 1).unwrap_or(0));
        // The numbers lo..=hi are exactly `run` (consecutive, distinct owned fds): give up
        // ownership, then close them in one call.
        let raws: Vec<RawFd> = run
            .into_iter()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
            .collect();
        let (Ok(first), Ok(last)) = (libc::c_uint::try_from(lo), libc::c_uint::try_from(hi)) else {
            close_raw(&raws);
            continue;
        };
        // SAFETY: every fd in first..=last is one this function owns (see above); no other
        // code holds these numbers, and none of them is used after this call.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
        if r != 0 {
            close_raw(&raws);
        }
    }
}

fn close_raw(raws: &[RawFd]) {
    for &raw in raws {
        // SAFETY: `raw` was an OwnedFd whose ownership close_fds took over; it is closed
        // exactly once, here.
        unsafe { libc::close(raw) };
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
