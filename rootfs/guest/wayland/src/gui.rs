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
            let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            if let Err(e) = sock::send_all(weston.as_fd(), &data, &b) {
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
