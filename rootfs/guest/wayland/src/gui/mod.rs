//! The GUI-side proxy: runs in gui-vm next to weston. It provides the virtio_wl service
//! `wayland` (the listener context `listen:wayland`), takes each connection the hub hands
//! over (`wl-conn-N`), opens a Unix connection to weston's socket for it, and moves bytes
//! and fds both ways.
//!
//! It cuts both streams into messages and decodes only the registry's
//! ([`registry`]): a connection from the hub sees and binds only the globals the app proxy
//! would serve, so an app VM that bypasses its proxy still cannot reach weston's privileged
//! globals (`--debug`'s screenshooter and debug protocol). Everything else passes as it is.
//!
//! Fds from the app side are vfds already: weston gets them as they are (a shared-memory
//! vfd is memory weston maps directly, zero copy). Fds from weston cross only as vfds
//! ([`vfd`]); one that cannot is dropped and logged, and the app side then sees a message
//! without its fd and ends that client.

pub mod registry;
pub mod vfd;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sock;
use crate::transport::{Acceptor, Channel, Transport, MAX_FDS};
use registry::RegistryFilter;
pub use vfd::{to_vfd, BLOB_BYTES};

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

/// Moves bytes and fds between one connection and weston until either side ends, through
/// the connection's registry filter. Returns why it ended.
pub fn join(far: &dyn Channel, weston: &UnixStream, t: &dyn Transport) -> String {
    let mut buf = vec![0u8; 4096];
    let mut filter = RegistryFilter::new();
    // Fds that came without a complete message to carry them (virtio_wl may deliver a
    // message's vfds in a receive of their own, and the filter holds a message back until
    // it is whole): a stream socket sends fds only with at least one byte, so they wait
    // for the next data, in order, in each direction.
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut held_out: Vec<OwnedFd> = Vec::new();
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
            let data = match filter.requests(&data) {
                Ok(d) => d,
                Err(refusal) => {
                    // Nothing of it reaches weston; the app side learns why, then the
                    // connection ends (weston's with it).
                    let _ = far.send(&refusal.event(), &[]);
                    return format!("refused: {refusal}");
                }
            };
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
            held_out.extend(fds.into_iter().filter_map(|f| to_vfd(f, t)));
            let data = match filter.events(buf.get(..n).unwrap_or_default()) {
                Ok(d) => d,
                Err(e) => return e,
            };
            if let Err(e) = to_far(far, &data, &mut held_out) {
                return format!("connection: {e}");
            }
        }
    }
}

/// Sends `data` to weston with the `held` fds (a stream carries fds only with data).
fn to_weston(weston: &UnixStream, data: &[u8], held: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    send_in_groups(data, held, |bytes, fds| {
        sock::send_all(weston.as_fd(), bytes, fds)
    })
}

/// Sends `data` to the app side with the `held` vfds.
fn to_far(far: &dyn Channel, data: &[u8], held: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    send_in_groups(data, held, |bytes, fds| far.send(bytes, fds))
}

/// Sends `data` with all the `held` fds through `send`, at most 28 fds per call: the excess
/// goes with the first bytes, one byte each. With no data the fds stay held.
fn send_in_groups(
    data: &[u8],
    held: &mut Vec<OwnedFd>,
    mut send: impl FnMut(&[u8], &[BorrowedFd<'_>]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut at = 0;
    while held.len() > MAX_FDS && at + 1 < data.len() {
        let group: Vec<OwnedFd> = held.drain(..MAX_FDS).collect();
        let b: Vec<BorrowedFd<'_>> = group.iter().map(|f| f.as_fd()).collect();
        send(data.get(at..at + 1).unwrap_or_default(), &b)?;
        at += 1;
    }
    let rest = data.get(at..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(());
    }
    let group: Vec<OwnedFd> = held.drain(..held.len().min(MAX_FDS)).collect();
    let b: Vec<BorrowedFd<'_>> = group.iter().map(|f| f.as_fd()).collect();
    send(rest, &b)
}

#[cfg(test)]
mod tests {
    use super::vfd::tests::memfd_with;
    use super::*;

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
