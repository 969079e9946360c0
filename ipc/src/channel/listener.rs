//! A listening SOCK_SEQPACKET socket bound to a path.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{sys, Channel, ChannelError};
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

/// A listening SOCK_SEQPACKET socket bound to a path (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct ChannelListener {
    fd: OwnedFd,
}

impl ChannelListener {
    /// Binds `path` (an existing socket file there is replaced), sets its mode, listens; the
    /// path appears only once the socket is listening.
    ///
    /// The mode is applied with chmod right after bind; callers that need the socket never
    /// to be reachable with a wider mode should bind inside a directory with tight
    /// permissions, and check `peer_credentials` on every accepted channel anyway.
    pub fn bind(path: &Path, mode: u32) -> Result<ChannelListener, ChannelError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys("socket"))?;
        // Bind under a temporary name and rename into place once listening, so the path
        // never names a socket that refuses connections (clients may start polling for it
        // at once). Paths too long for the extra suffix are bound directly.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".binding");
        let tmp = std::path::PathBuf::from(tmp);
        let staged = tmp.as_os_str().len() < 100;
        let bind_path: &Path = if staged { &tmp } else { path };
        if staged {
            if let Ok(meta) = std::fs::symlink_metadata(&tmp) {
                if meta.file_type().is_socket() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
        let addr = UnixAddr::new(bind_path.as_os_str().as_bytes()).map_err(sys("socket path"))?;
        bind(fd.as_raw_fd(), &addr).map_err(sys("bind"))?;
        let io_err = |op: &'static str| {
            move |e: std::io::Error| ChannelError::Sys {
                op,
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        };
        let finish = || -> Result<(), ChannelError> {
            std::fs::set_permissions(bind_path, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("chmod socket"))?;
            listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN)).map_err(sys("listen"))?;
            if staged {
                std::fs::rename(bind_path, path).map_err(io_err("rename socket into place"))?;
            }
            Ok(())
        };
        if let Err(e) = finish() {
            if staged {
                let _ = std::fs::remove_file(bind_path);
            }
            return Err(e);
        }
        Ok(ChannelListener { fd })
    }

    /// Accepts one connection; `WouldBlock` when none is pending. The channel is blocking
    /// and close-on-exec; use the `try_*` calls from a poll loop.
    pub fn accept(&self) -> Result<Channel, ChannelError> {
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(sys("accept4"))?;
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Channel { fd })
    }
}

impl AsFd for ChannelListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
