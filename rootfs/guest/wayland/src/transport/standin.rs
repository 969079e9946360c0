//! A stand-in for virtio_wl, for tests on the build machine (no guest kernel there has the
//! driver): connections are Unix socketpairs, shared memory is memfds, pipes are pipes.
//!
//! It keeps virtio_wl's rules so that tests catch what the real device would refuse: only
//! *vfds* (objects this transport made, or received over it) may be sent, at most 28 per
//! message; a message arrives as at most 4096 bytes per receive; a connection to a service
//! nobody provides fails (as `RESP_ERR` does). Both proxies of a test share one `StandIn`.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use super::{Acceptor, Channel, Mapping, PipeFromPeer, Transport, MAX_FDS};
use crate::sock;

type Conn = (Box<dyn Channel>, String);

#[derive(Default)]
struct Inner {
    /// (st_dev, st_ino) of every object that is a "vfd".
    vfds: Mutex<HashSet<(u64, u64)>>,
    services: Mutex<HashMap<String, Sender<Conn>>>,
    next_conn: Mutex<u64>,
}

/// The stand-in device, shared by the proxies of one test.
#[derive(Clone, Default)]
pub struct StandIn {
    inner: Arc<Inner>,
}

fn key(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|s| (s.st_dev, s.st_ino))
}

impl StandIn {
    /// A new stand-in with no services.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, fd: BorrowedFd<'_>) {
        if let (Some(k), Ok(mut v)) = (key(fd), self.inner.vfds.lock()) {
            v.insert(k);
        }
    }

    /// Provides `service`: connections to `service` or `service@anything` arrive here.
    pub fn listen(&self, service: &str) -> StandInAcceptor {
        let (tx, rx) = channel();
        if let Ok(mut s) = self.inner.services.lock() {
            s.insert(service.to_string(), tx);
        }
        StandInAcceptor { rx }
    }

    /// Stops providing `service` (later connections fail, as without a grant).
    pub fn unlisten(&self, service: &str) {
        if let Ok(mut s) = self.inner.services.lock() {
            s.remove(service);
        }
    }

    fn channel(&self, s: UnixStream) -> Box<dyn Channel> {
        self.register(s.as_fd());
        Box::new(StandInChannel {
            sock: s,
            owner: self.clone(),
        })
    }
}

/// One end of a stand-in connection.
pub struct StandInChannel {
    sock: UnixStream,
    owner: StandIn,
}

impl Channel for StandInChannel {
    fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        if fds.len() > MAX_FDS {
            // VIRTWL_IOCTL_SEND refuses more than 28 fds.
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(bad) = fds.iter().find(|f| !self.owner.is_vfd(**f)) {
            // The driver refuses an fd that is not a vfd.
            log::error!("stand-in transport: fd {} is not a vfd", bad.as_raw_fd());
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        if data.is_empty() && fds.is_empty() {
            return Ok(());
        }
        sock::send_all(self.sock.as_fd(), data, fds)
    }

    fn recv(&self) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        let mut buf = vec![0u8; 4096];
        let (n, fds) = sock::recv_with_fds(self.sock.as_fd(), &mut buf, false)?;
        buf.truncate(n);
        for f in &fds {
            self.owner.register(f.as_fd());
        }
        Ok((buf, fds))
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// The faux accept of the stand-in.
pub struct StandInAcceptor {
    rx: Receiver<Conn>,
}

impl Acceptor for StandInAcceptor {
    fn accept(&mut self) -> std::io::Result<(Box<dyn Channel>, String)> {
        self.rx
            .recv()
            .map_err(|_| std::io::Error::other("the stand-in service was withdrawn"))
    }
}

fn memfd(size: usize) -> std::io::Result<OwnedFd> {
    // SAFETY: a static NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"standin-vfd".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(size as u64)?;
    let fd = OwnedFd::from(f);
    // Sealed against grow and shrink, as the VMM seals guest-allocated memory.
    // SAFETY: F_ADD_SEALS on an fd we own.
    if unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl Transport for StandIn {
    fn connect(&self, name: &str) -> std::io::Result<Box<dyn Channel>> {
        let service = name.split('@').next().unwrap_or(name);
        let tx = self
            .inner
            .services
            .lock()
            .ok()
            .and_then(|s| s.get(service).cloned())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENODEV))?;
        let (a, b) = UnixStream::pair()?;
        let n = match self.inner.next_conn.lock() {
            Ok(mut n) => {
                *n += 1;
                *n - 1
            }
            Err(_) => 0,
        };
        tx.send((self.channel(b), format!("wl-conn-{n}")))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ENODEV))?;
        Ok(self.channel(a))
    }

    fn alloc(&self, size: usize) -> std::io::Result<(OwnedFd, Mapping)> {
        let page = 4096usize;
        let rounded = size
            .checked_add(page - 1)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?
            & !(page - 1);
        let fd = memfd(rounded.max(page))?;
        self.register(fd.as_fd());
        let map = Mapping::new_backed(fd.as_fd(), size.max(1), true)?;
        Ok((fd, map))
    }

    fn pipe_from_peer(&self) -> std::io::Result<PipeFromPeer> {
        let (r, w) = crate::sock::pipe()?;
        self.register(r.as_fd());
        Ok(PipeFromPeer {
            local: Box::new(std::fs::File::from(r)) as Box<dyn Read + Send>,
            remote: w,
        })
    }

    fn received_pipe_writer(&self, fd: OwnedFd) -> Box<dyn Write + Send> {
        Box::new(std::fs::File::from(fd))
    }

    fn map_received(&self, fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        // A memfd may be shorter than the peer says: mapped unbacked (system calls only).
        Mapping::new(fd, len, false)
    }

    fn is_vfd(&self, fd: BorrowedFd<'_>) -> bool {
        match (key(fd), self.inner.vfds.lock()) {
            (Some(k), Ok(v)) => v.contains(&k),
            _ => false,
        }
    }
}
