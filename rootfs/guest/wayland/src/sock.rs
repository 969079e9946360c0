//! Unix stream sockets with fds (SCM_RIGHTS): what Wayland clients and weston speak.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

fn nix_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Receives up to `buf.len()` bytes and the fds that came with them (owned at once,
/// close-on-exec). `Ok((0, []))` is the peer's end. `dontwait`: `WouldBlock` instead of
/// waiting.
pub fn recv_with_fds(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    dontwait: bool,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    // Room for the most fds the kernel passes with one message (SCM_MAX_FD), so that a
    // peer that sends more than libwayland's 28 loses none of them.
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [IoSliceMut::new(buf)];
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if dontwait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), flags) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: the kernel installed these fds for this process
                                // just now; each is owned exactly once.
                                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                            }
                        }
                    }
                }
                if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                    return Err(std::io::Error::other("fds were cut off"));
                }
                return Ok((msg.bytes, fds));
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_io(e)),
        }
    }
}

/// Sends some of `data` with `fds` (all of them, with the first byte). Returns the bytes
/// sent. `dontwait`: `WouldBlock` instead of waiting.
pub fn send_with_fds(
    fd: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    dontwait: bool,
) -> std::io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let mut flags = MsgFlags::MSG_NOSIGNAL;
    if dontwait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => return Ok(n),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_io(e)),
        }
    }
}

/// Sends all of `data` with `fds` (with the first part), waiting as needed.
pub fn send_all(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut n = send_with_fds(fd, data, fds, false)?;
    while n < data.len() {
        let rest = data.get(n..).unwrap_or_default();
        let m = send_with_fds(fd, rest, &[], false)?;
        if m == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        n += m;
    }
    Ok(())
}

/// Waits up to `timeout_ms` (-1: forever) for `fds` to be ready; returns their `revents`.
pub fn poll(
    fds: &[(BorrowedFd<'_>, libc::c_short)],
    timeout_ms: i32,
) -> std::io::Result<Vec<libc::c_short>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, ev)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *ev,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(pfds.iter().map(|p| p.revents).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A new pipe (read end, write end), close-on-exec.
pub fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(nix_io)
}
