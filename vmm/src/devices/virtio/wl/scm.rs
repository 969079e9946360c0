//! sendmsg/recvmsg with SCM_RIGHTS on the host sockets behind socket vfds. Received fds are
//! owned (`OwnedFd`) as soon as they leave the control message, so none leak on any path.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::protocol::MAX_VFDS_PER_MESSAGE;

/// Whether this kernel takes RWF_NOWAIT on pipes (6.3 and later; 6.1 refuses it with
/// EOPNOTSUPP before doing anything). Learnt at the first refusal, so an older kernel costs
/// no failing call per message.
static PIPE_NOWAIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

fn pipe_nowait() -> bool {
    PIPE_NOWAIT.load(std::sync::atomic::Ordering::Relaxed)
}

fn no_pipe_nowait() {
    PIPE_NOWAIT.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Room for `MAX_VFDS_PER_MESSAGE` fds in one control message (CMSG_SPACE, rounded up).
const CMSG_BUF: usize = 256;

#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// Sends `data` and `fds` in one message without blocking. Returns the bytes sent;
/// `WouldBlock` when the socket is full.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    if fds.len() > MAX_VFDS_PER_MESSAGE {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_BUF]);
    // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let payload = std::mem::size_of_val(raw.as_slice());
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space.min(CMSG_BUF) as _;
        // SAFETY: msg_control points at `cbuf`, which is large enough (28 fds need 128 bytes)
        // and aligned; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        // Never blocks, whatever the socket's mode: the device worker must not wait on a peer.
        let n = unsafe {
            libc::sendmsg(
                sock.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Why a bounded send stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The peer took nothing before the deadline: nothing was sent (back-pressure; the
    /// caller may try again later).
    #[error("the peer is not reading (nothing sent)")]
    Full,
    /// The peer stopped reading part-way through: the stream is cut, so its write side was
    /// shut down (later sends fail at once).
    #[error("the peer stopped reading after {sent} of {len} bytes; write side shut down")]
    Cut { sent: usize, len: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Sends all of `data` (the fds go with the first part) without blocking for more than
/// `wait` in all: a peer that does not read costs the device worker at most `wait`.
pub fn send_all_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    wait: std::time::Duration,
) -> Result<(), SendError> {
    let deadline = std::time::Instant::now() + wait;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let mut sent = loop {
        match send_with_fds(sock, data, fds) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if left().is_zero() {
                    return Err(SendError::Full);
                }
                wait_writable(sock, left());
            }
            Err(e) => return Err(e.into()),
        }
    };
    while sent < data.len() {
        let rest = data.get(sent..).unwrap_or_default();
        match send_with_fds(sock, rest, &[]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if left().is_zero() {
                    // SAFETY: shutdown(2) on a descriptor we borrow; no memory involved.
                    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
                    return Err(SendError::Cut {
                        sent,
                        len: data.len(),
                    });
                }
                wait_writable(sock, left());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes all of `data` to a pipe, bounded by `wait` as [`send_all_with_fds`] (a pipe cannot
/// be shut down: when cut, the guest is told that the write failed). The pipe may be a peer's, shared
/// with it, so its mode is left alone: every write is `pwritev2(RWF_NOWAIT)`, which takes as
/// much as fits now and never blocks, so a message that fits is one system call; only when
/// the pipe is full does it wait for POLLOUT. On a kernel without RWF_NOWAIT for pipes it
/// waits for POLLOUT (room for at least one page) before each write of at most `PIPE_BUF`
/// bytes, which never blocks either.
pub fn write_all_bounded(
    pipe: BorrowedFd<'_>,
    data: &[u8],
    wait: std::time::Duration,
) -> Result<(), SendError> {
    let deadline = std::time::Instant::now() + wait;
    let mut done = 0;
    let mut nowait = pipe_nowait();
    while done < data.len() {
        let rest = data.get(done..).unwrap_or_default();
        if nowait {
            let iov = libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            };
            // SAFETY: `iov` points into `data`, which lives for the call; the kernel only reads.
            let n = unsafe { libc::pwritev2(pipe.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
            if n >= 0 {
                done += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::EINVAL) => {
                    no_pipe_nowait();
                    nowait = false;
                }
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {}
                _ => return Err(e.into()),
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !poll_writable(pipe, left)? {
            return Err(if done == 0 {
                SendError::Full
            } else {
                SendError::Cut {
                    sent: done,
                    len: data.len(),
                }
            });
        }
        if nowait {
            continue;
        }
        let chunk = rest
            .get(..rest.len().min(libc::PIPE_BUF))
            .unwrap_or_default();
        // SAFETY: writes from a live slice; after POLLOUT a write of at most PIPE_BUF bytes
        // to a pipe does not block.
        let n = unsafe { libc::write(pipe.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
        if n >= 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if !matches!(
            e.kind(),
            std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
        ) {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Reads what a pipe holds now without ever blocking, and without touching its mode (the
/// pipe may be shared with a peer, so O_NONBLOCK is left alone): another reader may have
/// drained it between the caller's poll and this read. One `preadv2(RWF_NOWAIT)` (which
/// never waits, even for a reader racing with us); on a kernel without RWF_NOWAIT for pipes,
/// FIONREAD says how many bytes are there and at most that many are read. `Ok(0)` is end of
/// file (empty, no writer left); `WouldBlock` means nothing to read now.
pub fn read_pipe_now(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    if !pipe_nowait() {
        return read_pipe_measured(pipe, buf);
    }
    let fd = pipe.as_raw_fd();
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` points into `buf`, which lives for the call.
        let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP | libc::EINVAL) => {
                no_pipe_nowait();
                return read_pipe_measured(pipe, buf);
            }
            _ => return Err(e),
        }
    }
}

/// [`read_pipe_now`] for kernels without RWF_NOWAIT on pipes: FIONREAD, then a read of at
/// most that much.
fn read_pipe_measured(pipe: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    let fd = pipe.as_raw_fd();
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into `avail`.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let avail = usize::try_from(avail).unwrap_or(0);
    if avail == 0 {
        // Empty: end of file if no writer is left (POLLHUP), otherwise a read would block.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call; no wait.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n == 1 && pfd.revents & libc::POLLHUP != 0 && pfd.revents & libc::POLLIN == 0 {
            return Ok(0);
        }
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    let want = avail.min(buf.len());
    // SAFETY: reads into `buf`, which has at least `want` writable bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// True once `fd` is writable (or has an error to report on write); false if `left`
/// passed first.
fn poll_writable(fd: BorrowedFd<'_>, left: std::time::Duration) -> std::io::Result<bool> {
    let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(n > 0)
}

/// Waits until `fd` is writable or `left` passes (errors and EINTR just return).
fn wait_writable(fd: BorrowedFd<'_>, left: std::time::Duration) {
    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// What one non-blocking receive produced.
pub struct Received {
    /// Bytes read into the buffer.
    pub len: usize,
    /// File descriptors that came with them (at most 28).
    pub fds: Vec<OwnedFd>,
    /// The sender passed more fds than fit; the extra ones were closed by the kernel.
    pub truncated: bool,
}

/// Receives at most `buf.len()` bytes and up to 28 fds without blocking.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; CMSG_BUF]);
    // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_VFDS_PER_MESSAGE * 4) as u32) } as usize;
    msg.msg_controllen = space.min(CMSG_BUF) as _;
    let n = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg`'s control area; CMSG_FIRSTHDR/NXTHDR walk only inside
    // msg_controllen, and every SCM_RIGHTS payload is an array of fds now owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = data.offset_from(cmsg.cast::<u8>()) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / 4;
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i * 4).cast::<RawFd>());
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn a_message_larger_than_the_socket_takes_is_cut_and_the_stream_shut() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 8 << 20];
        let e = send_all_with_fds(a.as_fd(), &big, &[], Duration::from_millis(20)).unwrap_err();
        let SendError::Cut { sent, len } = e else {
            panic!("{e}");
        };
        assert!(sent > 0 && sent < len, "{sent} of {len}");
        // What got in arrives intact, then EOF: the write side was shut down.
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), sent);
        let again = send_all_with_fds(a.as_fd(), b"x", &[], Duration::from_millis(20));
        assert!(matches!(again, Err(SendError::Io(_))), "{again:?}");
    }

    #[test]
    fn a_full_socket_sends_nothing_and_says_so() {
        let (a, _b) = UnixStream::pair().unwrap();
        let msg = [1u8; 64];
        let wait = Duration::from_millis(10);
        let mut n = 0;
        let err = loop {
            match send_all_with_fds(a.as_fd(), &msg, &[], wait) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 1_000_000);
        };
        assert!(matches!(err, SendError::Full), "{err}");
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned two new fds that nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Both ways of reading a pipe now (RWF_NOWAIT where the kernel has it, FIONREAD and a
    /// sized read where not) never block, read what is there, and see end of file.
    #[test]
    fn pipe_reads_never_block_either_way() {
        for measured in [false, true] {
            let read = |p: BorrowedFd<'_>, b: &mut [u8]| {
                if measured {
                    read_pipe_measured(p, b)
                } else {
                    read_pipe_now(p, b)
                }
            };
            let (r, w) = pipe();
            let mut buf = [0u8; 64];
            let e = read(r.as_fd(), &mut buf).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
            write_all_bounded(w.as_fd(), b"hello", Duration::from_millis(10)).unwrap();
            assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 5);
            assert_eq!(&buf[..5], b"hello");
            drop(w);
            assert_eq!(read(r.as_fd(), &mut buf).unwrap(), 0);
        }
    }

    /// A write larger than the pipe holds goes in as far as it fits, then is cut when the
    /// reader takes nothing; a full pipe takes nothing and says so.
    #[test]
    fn pipe_writes_are_bounded() {
        let (r, w) = pipe();
        let big = vec![1u8; 1 << 20];
        let e = write_all_bounded(w.as_fd(), &big, Duration::from_millis(10)).unwrap_err();
        assert!(matches!(e, SendError::Cut { .. }), "{e}");
        let e = write_all_bounded(w.as_fd(), b"x", Duration::from_millis(10)).unwrap_err();
        assert!(matches!(e, SendError::Full), "{e}");
        drop(r);
    }
}
