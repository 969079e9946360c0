//! Fds from weston as vfds. Only vfds cross virtio_wl: a vfd weston got from a client goes
//! back as it is; a memory file (the keymap) becomes a shared-memory vfd with the same
//! bytes; the write end of a pipe weston made (its clipboard manager reading a selection)
//! becomes a virtio_wl pipe whose data the proxy splices into it. Anything else is dropped
//! and logged.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::pipes;
use crate::transport::Transport;

/// Bytes copied for fds weston sent that were not vfds (keymaps).
pub static BLOB_BYTES: AtomicU64 = AtomicU64::new(0);

/// An fd from weston as a vfd: as it is if it is one, else translated; `None` if it
/// cannot cross.
pub fn to_vfd(fd: OwnedFd, t: &dyn Transport) -> Option<OwnedFd> {
    if t.is_vfd(fd.as_fd()) {
        if !is_write_only(&fd) {
            return Some(fd);
        }
        // The write end of a pipe a peer sent (wl-paste's, given to the selection's owner
        // by weston): the device cannot pass a received pipe on (Bulkhead's VMM and crosvm
        // answer INVALID_TYPE), so a new pipe vfd goes out and its data is written into the
        // received one.
        return match t.pipe_from_peer() {
            Ok(p) => {
                pipes::splice(
                    "transfer to a peer's pipe",
                    p.local,
                    t.received_pipe_writer(fd),
                );
                Some(p.remote)
            }
            Err(e) => {
                log::warn!("dropping a peer's pipe from weston: no virtio_wl pipe: {e}");
                None
            }
        };
    }
    let st = match nix::sys::stat::fstat(fd.as_fd()) {
        Ok(st) => st,
        Err(e) => {
            log::warn!("dropping an fd from weston: fstat: {e}");
            return None;
        }
    };
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {
            let size = usize::try_from(st.st_size).unwrap_or(0).max(1);
            if size > crate::app::state::MAX_BLOB {
                log::warn!("dropping a {size}-byte file from weston (too large to copy)");
                return None;
            }
            let (vfd, map) = match t.alloc(size) {
                Ok(x) => x,
                Err(e) => {
                    log::warn!("dropping a {size}-byte file from weston: no shared memory: {e}");
                    return None;
                }
            };
            match map.fill_from(0, size, fd.as_fd(), 0) {
                Ok(n) => {
                    BLOB_BYTES.fetch_add(n as u64, Ordering::Relaxed);
                    Some(vfd)
                }
                Err(e) => {
                    log::warn!("dropping a file from weston: {e}");
                    None
                }
            }
        }
        libc::S_IFIFO => {
            if is_write_only(&fd) {
                match t.pipe_from_peer() {
                    Ok(p) => {
                        pipes::splice(
                            "transfer to weston",
                            p.local,
                            Box::new(std::fs::File::from(fd)),
                        );
                        Some(p.remote)
                    }
                    Err(e) => {
                        log::warn!("dropping a pipe from weston: no virtio_wl pipe: {e}");
                        None
                    }
                }
            } else {
                log::warn!("dropping the read end of a pipe from weston (only write ends cross)");
                None
            }
        }
        other => {
            log::warn!("dropping an fd of type {other:o} from weston");
            None
        }
    }
}

/// Whether `fd` was opened write-only (a pipe's write end; the driver gives a write pipe
/// vfd O_WRONLY, as ChromiumOS's does).
fn is_write_only(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on an fd we own.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_ACCMODE == libc::O_WRONLY
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sock;
    use crate::transport::standin::StandIn;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A memory file holding `bytes` (what weston sends as a keymap).
    pub(in crate::gui) fn memfd_with(bytes: &[u8]) -> OwnedFd {
        // SAFETY: a static NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"weston-keymap".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nothing else owns.
        let mut f =
            std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        f.write_all(bytes).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn weston_fds_become_vfds() {
        let t = StandIn::new();
        // A keymap memfd: a new vfd with the same bytes.
        let v = to_vfd(memfd_with(b"xkb_keymap {};"), &t).unwrap();
        assert!(t.is_vfd(v.as_fd()));
        let m = crate::transport::Mapping::new_backed(v.as_fd(), 14, false).unwrap();
        let mut b = [0u8; 14];
        m.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"xkb_keymap {};");
        // weston's own pipe write end: a pipe vfd whose data reaches weston's pipe.
        let (r, w) = sock::pipe().unwrap();
        let v = to_vfd(w, &t).unwrap();
        assert!(t.is_vfd(v.as_fd()));
        std::fs::File::from(v).write_all(b"selection").unwrap();
        let mut got = String::new();
        std::fs::File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "selection");
        // A read end, a socket: dropped.
        let (r, _w) = sock::pipe().unwrap();
        assert!(to_vfd(r, &t).is_none());
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(to_vfd(OwnedFd::from(a), &t).is_none());
        // A vfd: itself.
        let (v, _m) = t.alloc(10).unwrap();
        let ino = nix::sys::stat::fstat(v.as_fd()).unwrap().st_ino;
        let same = to_vfd(v, &t).unwrap();
        assert_eq!(nix::sys::stat::fstat(same.as_fd()).unwrap().st_ino, ino);
    }

    /// wl-paste in one VM, wl-copy in another: weston hands the paster's pipe (a vfd the
    /// proxy received) to the copier's connection. The device refuses to send a received
    /// pipe on (INVALID_TYPE, which closed the copier's connection), so a new pipe vfd must
    /// go instead, its data reaching the paster's pipe.
    #[test]
    fn a_peers_pipe_from_weston_goes_on_as_a_new_pipe_into_it() {
        let t = StandIn::new();
        let received = t.pipe_from_peer().unwrap();
        let mut paster = received.local;
        let ino = nix::sys::stat::fstat(received.remote.as_fd())
            .unwrap()
            .st_ino;
        let v = to_vfd(received.remote, &t).unwrap();
        assert!(t.is_vfd(v.as_fd()));
        assert_ne!(
            nix::sys::stat::fstat(v.as_fd()).unwrap().st_ino,
            ino,
            "the received pipe itself would go back out"
        );
        std::fs::File::from(v).write_all(b"token").unwrap();
        let mut got = String::new();
        paster.read_to_string(&mut got).unwrap();
        assert_eq!(got, "token");
    }
}
