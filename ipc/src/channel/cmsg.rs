//! SCM_RIGHTS control messages: room for exactly `MAX_FDS` fds, writing them, taking
//! ownership of the ones received, and the checks on each received datagram.

use std::ffi::c_void;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::ChannelError;
use crate::frame::MAX_FDS;

/// The checks `recv_frame_with` makes on one received datagram (`len` bytes, `flags` from
/// its msghdr, its fds already owned): truncation, the fd bound, empty datagrams and EOF.
pub(super) fn check_datagram(
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
pub(super) fn write_rights<F: AsFd>(ctl: &mut [u64; CONTROL_WORDS], fds: &[F]) -> Option<usize> {
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

/// Room for exactly MAX_FDS fds in one SCM_RIGHTS message: one more makes the kernel set
/// MSG_CTRUNC. 32 words = 256 bytes, far more than CMSG_SPACE(28 * 4) = 128.
pub(super) const CONTROL_WORDS: usize = 32;

pub(super) fn control_len() -> usize {
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
pub(super) unsafe fn take_rights(hdr: &libc::msghdr) -> Vec<OwnedFd> {
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
