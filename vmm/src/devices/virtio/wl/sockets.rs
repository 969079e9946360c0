//! The VMM's named sockets, which NEW_CTX / NEW_CTX_NAMED connect vfds to.
//!
//! A socket is `Listening(path)` (a host listening socket: connect(2) on every use) or
//! `NonListening(stream)` (an already-connected stream, e.g. one end of a socketpair from the
//! hub: consumed by the first connect). Names are added at start (`--wl-socket NAME=PATH`) and
//! at run time (the control socket's `wl add`, possibly with a `%d` pattern). A third kind,
//! `Hub(HubConn)`, is a connection the hub handed over in a faux accept (`HubEvent::Accept`):
//! like `NonListening` it is consumed by the first connect, and the vfd it gives is backed by
//! the hub connection (SEQPACKET frames), not a byte stream. The registry has its own short
//! lock, separate from the device: adding a socket never waits for the guest.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulkhead_ipc::hub::client::HubConn;

use super::protocol::CTX_NAME_MAX_LEN;

/// At most this many names at once.
pub const MAX_SOCKETS: usize = 1024;

/// One named socket.
#[derive(Debug)]
pub enum WlSocket {
    /// A listening socket at a host path.
    Listening(PathBuf),
    /// An accepted (connected) stream, handed to the first connect.
    NonListening(UnixStream),
    /// A hub connection from a faux accept (`wl-conn-N`), handed to the first connect.
    Hub(HubConn),
}

/// What a connect to a name gives.
#[derive(Debug)]
pub enum Connected {
    /// A stream socket (listening path connected, or a non-listening stream).
    Stream(UnixStream),
    /// A hub connection.
    Hub(HubConn),
}

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// No socket by that name (the guest gets RESP_ERR).
    #[error("no wl socket named {0:?}")]
    NotFound(String),
    /// The name is taken.
    #[error("wl socket name {0:?} already in use")]
    Exists(String),
    /// The name is too long, contains NUL, or is a bad pattern.
    #[error("bad wl socket name {0:?} (at most 32 bytes, no NUL, at most one %d)")]
    BadName(String),
    /// Too many sockets.
    #[error("too many wl sockets (limit {MAX_SOCKETS})")]
    Full,
    /// The name is a hub connection, which only the device can take (`take`).
    #[error("wl socket {0:?} is a hub connection")]
    HubConnection(String),
    /// The listener's backlog stayed full for the whole wait: it is not accepting.
    #[error("connecting to {path}: the listener accepted nothing within {wait:?} (backlog full)")]
    Busy {
        /// The path.
        path: String,
        /// How long the connect waited.
        wait: Duration,
    },
    /// connect(2) failed.
    #[error("connecting to {path}: {err}")]
    Connect {
        /// The path.
        path: String,
        /// Why.
        err: std::io::Error,
    },
}

#[derive(Default)]
struct Registry {
    sockets: BTreeMap<String, WlSocket>,
    /// Next number to try for each `%d` pattern.
    counters: BTreeMap<String, u64>,
}

/// The named sockets of one VM; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct WlSockets {
    inner: Arc<Mutex<Registry>>,
}

fn check_name(name: &str) -> Result<(), SocketError> {
    if name.len() > CTX_NAME_MAX_LEN || name.contains('\0') {
        return Err(SocketError::BadName(name.to_string()));
    }
    Ok(())
}

impl WlSockets {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `socket` under `name`, or, if `name` contains `%d`, under the pattern's next
    /// number (`wl-conn-%d` → `wl-conn-0`, `wl-conn-1`, …): a counter per pattern that only
    /// moves forward, skipping names taken now, so a number is never given out twice even
    /// after its name went away. Returns the name.
    pub fn add(&self, name: &str, socket: WlSocket) -> Result<String, SocketError> {
        let pattern = name.matches("%d").count();
        if pattern > 1 {
            return Err(SocketError::BadName(name.to_string()));
        }
        let mut reg = self.lock();
        if reg.sockets.len() >= MAX_SOCKETS {
            return Err(SocketError::Full);
        }
        let chosen = if pattern == 1 {
            let mut n = reg.counters.get(name).copied().unwrap_or(0);
            loop {
                let candidate = name.replacen("%d", &n.to_string(), 1);
                n = n.wrapping_add(1);
                if !reg.sockets.contains_key(&candidate) {
                    check_name(&candidate)?;
                    reg.counters.insert(name.to_string(), n);
                    break candidate;
                }
            }
        } else {
            check_name(name)?;
            if reg.sockets.contains_key(name) {
                return Err(SocketError::Exists(name.to_string()));
            }
            name.to_string()
        };
        reg.sockets.insert(chosen.clone(), socket);
        Ok(chosen)
    }

    /// Removes a name (a no-op if absent).
    pub fn remove(&self, name: &str) -> Option<WlSocket> {
        self.lock().sockets.remove(name)
    }

    /// The names present, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().sockets.keys().cloned().collect()
    }

    /// True if `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().sockets.contains_key(name)
    }

    /// Removes `name` only if it is an unconsumed hub connection (the hub closed it before
    /// the guest connected). Returns whether it did.
    pub fn remove_hub(&self, name: &str) -> bool {
        let mut reg = self.lock();
        if matches!(reg.sockets.get(name), Some(WlSocket::Hub(_))) {
            reg.sockets.remove(name);
            return true;
        }
        false
    }

    /// Connects to `name`: connect(2) for a listening socket (outside the lock; waiting at
    /// most [`DEFAULT_SEND_WAIT`](super::limits::DEFAULT_SEND_WAIT) for room in its backlog),
    /// or takes the stream of a non-listening one (which removes the name). A hub connection
    /// is left in place and refused (`HubConnection`); the device uses [`WlSockets::take`].
    pub fn connect(&self, name: &str) -> Result<UnixStream, SocketError> {
        {
            let reg = self.lock();
            if matches!(reg.sockets.get(name), Some(WlSocket::Hub(_))) {
                return Err(SocketError::HubConnection(name.to_string()));
            }
        }
        match self.take(name, super::limits::DEFAULT_SEND_WAIT)? {
            Connected::Stream(s) => Ok(s),
            Connected::Hub(_) => Err(SocketError::HubConnection(name.to_string())),
        }
    }

    /// Connects to `name` whatever its kind: connect(2) for a listening socket (outside the
    /// lock), waiting at most `wait` while its backlog is full ([`connect_bounded`]); a
    /// non-listening stream or a hub connection is taken (the name disappears).
    pub fn take(&self, name: &str, wait: Duration) -> Result<Connected, SocketError> {
        let path = {
            let mut reg = self.lock();
            match reg.sockets.get(name) {
                None => return Err(SocketError::NotFound(name.to_string())),
                Some(WlSocket::Listening(p)) => p.clone(),
                Some(WlSocket::NonListening(_) | WlSocket::Hub(_)) => {
                    return match reg.sockets.remove(name) {
                        Some(WlSocket::NonListening(s)) => Ok(Connected::Stream(s)),
                        Some(WlSocket::Hub(h)) => Ok(Connected::Hub(h)),
                        _ => Err(SocketError::NotFound(name.to_string())),
                    };
                }
            }
        };
        match connect_bounded(&path, wait) {
            Ok(s) => Ok(Connected::Stream(s)),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Err(SocketError::Busy {
                path: path.display().to_string(),
                wait,
            }),
            Err(err) => Err(SocketError::Connect {
                path: path.display().to_string(),
                err,
            }),
        }
    }
}

fn set_send_timeout(fd: RawFd, t: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_SNDTIMEO reads one timeval from a live local.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// connect(2) to the stream socket listening at `path`, waiting at most `wait` while its
/// backlog is full; `WouldBlock` when the wait ran out.
///
/// A plain non-blocking connect cannot wait for a Unix socket: with the backlog full it
/// fails with EAGAIN at once and nothing stays in progress to poll for. A blocking connect
/// waits for room for as long as the socket's send timeout allows and wakes as soon as the
/// listener accepts, so the connect runs with SO_SNDTIMEO = the time left, which is then
/// put back to 0 (no timeout, the default): the socket may travel on to other processes.
pub fn connect_bounded(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    // SAFETY: an all-zero sockaddr_un is valid; the family and path are set below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let deadline = Instant::now() + wait;
    loop {
        // At least a microsecond: a zero timeout would mean "wait forever".
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        set_send_timeout(fd.as_raw_fd(), left)?;
        // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes for the call.
        let r = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), addr_len) };
        if r == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) if Instant::now() < deadline => continue,
            Some(libc::EINTR | libc::EAGAIN) => return Err(std::io::ErrorKind::WouldBlock.into()),
            _ => return Err(e),
        }
    }
    set_send_timeout(fd.as_raw_fd(), Duration::ZERO)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn patterns_give_fresh_names() {
        let s = WlSockets::new();
        let mk = || WlSocket::NonListening(UnixStream::pair().unwrap().0);
        assert_eq!(s.add("wl-conn-%d", mk()).unwrap(), "wl-conn-0");
        assert_eq!(s.add("wl-conn-%d", mk()).unwrap(), "wl-conn-1");
        assert_eq!(s.add("wl-conn-2", mk()).unwrap(), "wl-conn-2");
        assert_eq!(s.add("wl-conn-%d", mk()).unwrap(), "wl-conn-3");
        assert!(matches!(
            s.add("wl-conn-2", mk()),
            Err(SocketError::Exists(_))
        ));
        assert!(matches!(s.add("%d-%d", mk()), Err(SocketError::BadName(_))));
        assert!(matches!(
            s.add(&"x".repeat(33), mk()),
            Err(SocketError::BadName(_))
        ));
    }

    #[test]
    fn non_listening_is_consumed_listening_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let s = WlSockets::new();
        s.add("wayland", WlSocket::Listening(path)).unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let name = s.add("wl-conn-%d", WlSocket::NonListening(theirs)).unwrap();

        let mut c = s.connect(&name).unwrap();
        c.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        ours.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        assert!(matches!(s.connect(&name), Err(SocketError::NotFound(_))));

        for _ in 0..2 {
            let _c = s.connect("wayland").unwrap();
            listener.accept().unwrap();
        }
        assert!(matches!(s.connect("nope"), Err(SocketError::NotFound(_))));
    }

    #[test]
    fn bounded_connect_leaves_no_send_timeout_and_refuses_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let c = connect_bounded(&path, Duration::from_millis(50)).unwrap();
        assert_eq!(c.write_timeout().unwrap(), None, "SO_SNDTIMEO back to none");
        assert!(connect_bounded(&dir.path().join("none"), Duration::from_millis(50)).is_err());
        let long = dir.path().join("x".repeat(200));
        assert!(connect_bounded(&long, Duration::from_millis(50)).is_err());
    }
}
