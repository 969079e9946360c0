//! The GUI-side proxy: runs in gui-vm next to weston. It provides the virtio_wl service
//! `wayland` (the listener context `listen:wayland`), takes each connection the hub hands
//! over (`wl-conn-N`), opens a Unix connection to weston's socket for it, and moves bytes
//! and fds both ways without parsing them.
//!
//! Fds from the app side are vfds already: weston gets them as they are (a shared-memory
//! vfd is memory weston maps directly, zero copy). Fds from weston cross only as vfds, so
//! those that are not are translated: a memory file (the keymap) becomes a shared-memory
//! vfd with the same bytes; the write end of a pipe weston made itself (its clipboard
//! manager reading a selection) becomes a virtio_wl pipe whose data the proxy splices into
//! it. Anything else (a socket, a read end, a device) is dropped and logged; the app side
//! then sees a message without its fd and ends that client.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pipes;
use crate::sock;
use crate::transport::{Acceptor, Channel, Transport, MAX_FDS};

/// Bytes copied for fds weston sent that were not vfds (keymaps).
pub static BLOB_BYTES: AtomicU64 = AtomicU64::new(0);

/// Connects to weston's socket, waiting up to `wait` for it to appear (weston may start
/// after the proxy).
pub fn connect_compositor(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    let until = Instant::now() + wait;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < until => {
                log::debug!("waiting for {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts connections until the listener fails; each is joined to a new connection to
/// weston's socket at `compositor`, on a thread of its own.
pub fn serve(
    mut acceptor: impl Acceptor,
    transport: Arc<dyn Transport>,
    compositor: PathBuf,
    wait: Duration,
) -> std::io::Result<()> {
    loop {
        let (far, name) = acceptor.accept()?;
        let weston = match connect_compositor(&compositor, wait) {
            Ok(s) => s,
            Err(e) => {
                log::error!(
                    "{name}: cannot connect to the compositor at {}: {e}",
                    compositor.display()
                );
                continue;
            }
        };
        log::info!("{name}: joined to {}", compositor.display());
        let t = transport.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let end = join(far.as_ref(), &weston, t.as_ref());
                log::info!("{name}: closed ({end})");
            });
        if let Err(e) = spawned {
            log::error!("no thread for a connection: {e}");
        }
    }
}

/// Moves bytes and fds between one connection and weston until either side ends.
pub fn join(far: &dyn Channel, weston: &UnixStream, t: &dyn Transport) -> String {
    let mut buf = vec![0u8; 4096];
    // Fds that came without data (virtio_wl may deliver a message's vfds in a receive of
    // their own): a stream socket sends fds only with at least one byte, so they wait for
    // the next data.
    let mut held: Vec<OwnedFd> = Vec::new();
    loop {
        let rev = match sock::poll(
            &[
                (far.poll_fd(), libc::POLLIN),
                (weston.as_fd(), libc::POLLIN),
            ],
            -1,
        ) {
            Ok(r) => r,
            Err(e) => return format!("poll: {e}"),
        };
        let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if rev.first().copied().unwrap_or(0) & ready != 0 {
            let (data, fds) = match far.recv() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return format!("connection: {e}"),
            };
            if data.is_empty() && fds.is_empty() {
                return "the app side closed".into();
            }
            held.extend(fds);
            if let Err(e) = to_weston(weston, &data, &mut held) {
                return format!("weston's socket: {e}");
            }
        }
        if rev.get(1).copied().unwrap_or(0) & ready != 0 {
            let (n, fds) = match sock::recv_with_fds(weston.as_fd(), &mut buf, false) {
                Ok(x) => x,
                Err(e) => return format!("weston's socket: {e}"),
            };
            if n == 0 && fds.is_empty() {
                return "weston closed the connection".into();
            }
            let fds: Vec<OwnedFd> = fds.into_iter().filter_map(|f| to_vfd(f, t)).collect();
            let b: Vec<BorrowedFd<'_>> = fds.iter().take(MAX_FDS).map(|f| f.as_fd()).collect();
            if let Err(e) = far.send(buf.get(..n).unwrap_or_default(), &b) {
                return format!("connection: {e}");
            }
        }
    }
}

/// Sends `data` to weston with the `held` fds (all of them, at most 28 per `sendmsg`, the
/// excess with the first bytes; a stream carries fds only with data). With no data the fds
/// stay held.
fn to_weston(weston: &UnixStream, data: &[u8], held: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    let mut at = 0;
    while held.len() > MAX_FDS && at + 1 < data.len() {
        let group: Vec<OwnedFd> = held.drain(..MAX_FDS).collect();
        let b: Vec<BorrowedFd<'_>> = group.iter().map(|f| f.as_fd()).collect();
        sock::send_all(weston.as_fd(), data.get(at..at + 1).unwrap_or_default(), &b)?;
        at += 1;
    }
    let rest = data.get(at..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(());
    }
    let group: Vec<OwnedFd> = held.drain(..held.len().min(MAX_FDS)).collect();
    let b: Vec<BorrowedFd<'_>> = group.iter().map(|f| f.as_fd()).collect();
    sock::send_all(weston.as_fd(), rest, &b)
}

/// An fd from weston as a vfd: as it is if it is one, else translated; `None` if it
/// cannot cross.
pub fn to_vfd(fd: OwnedFd, t: &dyn Transport) -> Option<OwnedFd> {
    if t.is_vfd(fd.as_fd()) {
        return Some(fd);
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
            // SAFETY: F_GETFL on an fd we own.
            let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            if fl >= 0 && fl & libc::O_ACCMODE == libc::O_WRONLY {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::standin::StandIn;
    use std::io::{Read, Write};

    fn memfd_with(bytes: &[u8]) -> OwnedFd {
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

    #[test]
    fn fds_without_data_wait_and_more_than_28_go_in_several_sends() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut held: Vec<OwnedFd> = (0..40).map(|_| memfd_with(b"x")).collect();
        to_weston(&a, &[], &mut held).unwrap();
        assert_eq!(held.len(), 40, "no data: nothing sent");
        to_weston(&a, b"0123456789", &mut held).unwrap();
        assert!(held.is_empty());
        let (mut bytes, mut fds, mut per) = (Vec::new(), 0, Vec::new());
        while bytes.len() < 10 {
            let mut buf = [0u8; 64];
            let (n, f) = sock::recv_with_fds(b.as_fd(), &mut buf, false).unwrap();
            bytes.extend_from_slice(&buf[..n]);
            fds += f.len();
            per.push(f.len());
        }
        assert_eq!(bytes, b"0123456789");
        assert_eq!(fds, 40);
        assert!(per.iter().all(|n| *n <= MAX_FDS), "{per:?}");
    }
}
