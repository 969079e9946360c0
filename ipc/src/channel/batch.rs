//! Batched receives and sends: many datagrams per system call (`recvmmsg`, `sendmmsg`).

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;

use super::cmsg::{check_datagram, control_len, take_rights, write_rights, CONTROL_WORDS};
use super::{sys, Channel, ChannelError, RawFrame};
use crate::frame::{self, FrameError, MAX_FDS, MAX_FRAME};

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
