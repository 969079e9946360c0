//! Where app VMs' connections come from: the virtio_wl service (`listen:net`, the faux
//! accept; the production path) or a Unix SOCK_SEQPACKET socket path (the same messages and
//! fds; for tests on the build machine and host-side use). A connection carries the hello
//! with the ring memfd, then doorbells both ways.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use bulkhead_wl::{Listener, Wl, WlError, WlStream};

/// What a connection gave.
#[derive(Debug)]
pub enum Recv {
    /// A message and its fds.
    Message(Vec<u8>, Vec<OwnedFd>),
    /// Nothing now.
    Nothing,
    /// The other side hung up.
    Hangup,
}

/// One app VM's connection.
pub trait Conn: Send {
    /// Polled for input.
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// The next message, without blocking.
    fn recv(&mut self) -> std::io::Result<Recv>;
    /// Sends a doorbell; `Ok(false)` if it cannot go now (try again later).
    fn kick(&mut self) -> std::io::Result<bool>;
}

/// A source of connections.
pub trait Accept {
    /// Polled for new connections.
    fn poll_fd(&self) -> BorrowedFd<'_>;
    /// The next connection and a name for logs, without blocking.
    fn accept(&mut self) -> std::io::Result<Option<(Box<dyn Conn>, String)>>;
}

fn wl_io(e: WlError) -> std::io::Error {
    match e {
        WlError::Io { err, .. } => err,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Most connections one `accept` call skips (their clients had left) before it returns.
const MAX_SKIPPED_PER_ACCEPT: usize = 64;

/// The virtio_wl service: a listener context on `/dev/wl0`.
pub struct WlAccept {
    listener: Listener<'static>,
}

impl WlAccept {
    /// Provides `service` (the policy must grant `provide <service>` to this VM).
    pub fn provide(device: &std::path::Path, service: &str) -> Result<Self, String> {
        let wl: &'static Wl = Box::leak(Box::new(
            Wl::open_path(device).map_err(|e| format!("{}: {e}", device.display()))?,
        ));
        let listener = Listener::bind(wl, &format!("listen:{service}"))
            .map_err(|e| format!("providing {service}: {e} (does the policy grant it?)"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok(Self { listener })
    }
}

impl Accept for WlAccept {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.listener.fd()
    }
    fn accept(&mut self) -> std::io::Result<Option<(Box<dyn Conn>, String)>> {
        // A connection its client closed before we took it cannot be opened (the name is
        // gone): that one is skipped, the next is tried; only the listener's own failures
        // end the service.
        for _ in 0..MAX_SKIPPED_PER_ACCEPT {
            match self.listener.accept() {
                Ok((stream, name)) => {
                    stream.set_nonblocking(true).map_err(wl_io)?;
                    return Ok(Some((Box::new(WlConn { stream }), name)));
                }
                Err(WlError::Io { err, .. }) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    return Ok(None)
                }
                Err(WlError::ListenerClosed) => {
                    return Err(std::io::Error::other("the listener context closed"))
                }
                Err(
                    e @ WlError::Io {
                        what: "VIRTWL_IOCTL_NEW",
                        ..
                    },
                ) => println!("netd: a connection could not be taken (its client left?): {e}"),
                Err(e) => return Err(wl_io(e)),
            }
        }
        Ok(None)
    }
}

struct WlConn {
    stream: WlStream,
}

impl Conn for WlConn {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.stream.fd()
    }
    fn recv(&mut self) -> std::io::Result<Recv> {
        match self.stream.recv() {
            Ok((data, fds)) if data.is_empty() && fds.is_empty() => Ok(Recv::Hangup),
            Ok((data, fds)) => Ok(Recv::Message(data, fds)),
            Err(WlError::Io { err, .. }) if err.kind() == std::io::ErrorKind::WouldBlock => {
                Ok(Recv::Nothing)
            }
            Err(e) => {
                println!("netd: a connection failed: {e}");
                Ok(Recv::Hangup)
            }
        }
    }
    fn kick(&mut self) -> std::io::Result<bool> {
        match self.stream.send(bulkhead_netring::KICK, &[]) {
            Ok(()) => Ok(true),
            Err(WlError::Io { err, .. }) if err.kind() == std::io::ErrorKind::WouldBlock => {
                Ok(false)
            }
            Err(e) => Err(wl_io(e)),
        }
    }
}

/// A Unix SOCK_SEQPACKET listening socket.
pub struct UnixAccept {
    fd: OwnedFd,
    next: u64,
}

fn cvt(r: libc::c_int, what: &str) -> std::io::Result<libc::c_int> {
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(r)
}

impl UnixAccept {
    /// Listens at `path` (a stale socket file there is replaced).
    pub fn bind(path: &std::path::Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        // SAFETY: plain socket(2); the result is checked.
        let fd = cvt(
            unsafe {
                libc::socket(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            },
            "socket",
        )?;
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let addr = nix::sys::socket::UnixAddr::new(path).map_err(std::io::Error::from)?;
        nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
        nix::sys::socket::listen(
            &fd,
            nix::sys::socket::Backlog::new(16).map_err(std::io::Error::from)?,
        )
        .map_err(std::io::Error::from)?;
        Ok(Self { fd, next: 0 })
    }
}

impl Accept for UnixAccept {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn accept(&mut self) -> std::io::Result<Option<(Box<dyn Conn>, String)>> {
        // SAFETY: accept4 without an address; the result is checked.
        let r = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(r) };
        self.next += 1;
        Ok(Some((
            Box::new(UnixConn { fd }),
            format!("unix-{}", self.next),
        )))
    }
}

/// One Unix SOCK_SEQPACKET connection (messages with fds by SCM_RIGHTS).
pub struct UnixConn {
    fd: OwnedFd,
}

impl UnixConn {
    /// Adopts a connected, non-blocking SOCK_SEQPACKET socket.
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl Conn for UnixConn {
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn recv(&mut self) -> std::io::Result<Recv> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 28]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Recv::Nothing),
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel installed these fds for us; each is owned once.
                    fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
        }
        let n = msg.bytes;
        if n == 0 && fds.is_empty() {
            return Ok(Recv::Hangup);
        }
        buf.truncate(n);
        Ok(Recv::Message(buf, fds))
    }
    fn kick(&mut self) -> std::io::Result<bool> {
        match nix::sys::socket::send(
            self.fd.as_raw_fd(),
            bulkhead_netring::KICK,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::EAGAIN) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
