//! Who is at the other end: SO_PEERCRED, and the check a control client makes before it
//! trusts a server's answer.

use std::os::fd::BorrowedFd;
use std::path::Path;

use super::{sys, ChannelError};
use nix::sys::socket::{getsockopt, sockopt};

/// Identity of the process at the other end of a connected Unix socket (SO_PEERCRED),
/// as the kernel recorded it at `connect(2)`/`socketpair(2)` time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Process id.
    pub pid: i32,
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
}

/// Reads SO_PEERCRED of any connected Unix socket.
pub fn peer_credentials(fd: BorrowedFd<'_>) -> Result<PeerCredentials, ChannelError> {
    let cred = getsockopt(&fd, sockopt::PeerCredentials).map_err(sys("getsockopt(SO_PEERCRED)"))?;
    Ok(PeerCredentials {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Which server a control client trusts (checked with SO_PEERCRED before it reads an
/// answer). Root and the client's own uid are always trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedServer {
    /// Only root (init's control socket).
    Root,
    /// Also the owner of the directory the socket is in, if that directory is writable by
    /// its owner alone: only that user could have put the socket there (the hub's runtime
    /// directory, a VMM's).
    DirOwner,
}

/// Checks the credentials of the process at the other end of `fd`, connected to `path`.
pub fn check_server(
    fd: BorrowedFd<'_>,
    path: &Path,
    trust: TrustedServer,
) -> Result<PeerCredentials, ChannelError> {
    use std::os::unix::fs::MetadataExt;
    let cred = peer_credentials(fd)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid == 0 || cred.uid == me {
        return Ok(cred);
    }
    if trust == TrustedServer::DirOwner {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let meta = std::fs::metadata(dir)
            .map_err(|e| ChannelError::UntrustedServer(format!("{}: {e}", dir.display())))?;
        if meta.mode() & 0o022 == 0 && meta.uid() == cred.uid {
            return Ok(cred);
        }
    }
    Err(ChannelError::UntrustedServer(format!(
        "{} is answered by uid {} (pid {}), which is neither root, you, nor the owner of a \
         directory only its owner can write",
        path.display(),
        cred.uid,
        cred.pid
    )))
}
