//! The hub's policy control socket: message types and a small client.
//!
//! Transport: `/run/bulkhead-hub/hub.sock`, `AF_UNIX` `SOCK_SEQPACKET`, one postcard-encoded
//! [`Request`] per datagram, answered by one [`Response`] datagram; no fds are passed. The
//! hub (crate `bulkhead-ipc`) implements the server; it decodes with [`decode_request`] and
//! answers with [`encode_response`]. `policyctl apply`, `status` and `log` are the clients.

use nix::sys::socket::{
    connect, recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where the hub listens.
pub const HUB_SOCKET: &str = "/run/bulkhead-hub/hub.sock";
/// Largest datagram either side sends or accepts.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// What a client asks the hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The running generation.
    Status,
    /// Load the tree at `root`, check that it hashes to `tree_hash` (what the client
    /// validated) and, with `if_match`, that the running generation hashes to it
    /// (compare-and-swap), then swap generations atomically.
    Apply {
        /// Hash of the tree the client validated.
        tree_hash: String,
        /// The directory to load (the hub re-validates it).
        root: PathBuf,
        /// Expected hash of the running generation.
        if_match: Option<String>,
        /// Tear down live capabilities the new generation no longer allows.
        revoke_live: bool,
    },
    /// Audit log records.
    Log(LogFilter),
}

/// Which audit records to return.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogFilter {
    /// Only denials.
    pub denied_only: bool,
    /// Only records whose source is this VM.
    pub vm: Option<String>,
    /// Only records with a sequence number ≥ this (for `--follow` and `--since`).
    pub since_seq: u64,
    /// At most this many records.
    pub max: u32,
}

/// What the hub answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(StatusInfo),
    /// Answer to a successful [`Request::Apply`].
    Applied(ApplyResult),
    /// Answer to [`Request::Log`].
    Log(LogBatch),
    /// The request failed (apply rejected, bad request…); the running generation is
    /// unchanged.
    Error {
        /// Why.
        message: String,
    },
}

/// The running generation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Generation number (increases by one per successful apply).
    pub generation: u64,
    /// `sha256:<hex>` of the running tree.
    pub tree_hash: String,
    /// The files it was loaded from.
    pub files: Vec<String>,
    /// The last rejected apply, if any.
    pub last_rejected: Option<RejectedApply>,
}

/// An apply the hub refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedApply {
    /// Hash of the refused tree.
    pub tree_hash: String,
    /// Why it was refused.
    pub reason: String,
    /// When (seconds since the epoch).
    pub at_unix: u64,
}

/// A live capability (connection, VFD, device) the new generation no longer allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCap {
    /// `connection`, `vfd` or `device`.
    pub kind: String,
    /// The VM holding it.
    pub vm: String,
    /// What it is (`browser → wayland@gpu-vm`, `vfd 0x40000012 memfd read+map`, …).
    pub description: String,
}

/// Result of an apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// The new generation number.
    pub generation: u64,
    /// Its tree hash.
    pub tree_hash: String,
    /// Live capabilities the new generation no longer allows.
    pub no_longer_allowed: Vec<LiveCap>,
    /// True if they were torn down (`--revoke-live`).
    pub revoked: bool,
}

/// One audit record (also the JSON-lines format of `policyctl log --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub seq: u64,
    /// Policy generation that decided.
    pub generation: u64,
    /// Seconds since the epoch.
    pub time_unix: u64,
    /// The deciding rules (`file:line`).
    pub rules: Vec<String>,
    /// Source VM.
    pub src: String,
    /// Verb (`connect`, `transfer`, `provide`, `device`, `quota`).
    pub verb: String,
    /// Object (`wayland@gpu-vm`, …).
    pub obj: String,
    /// Fd types and rights involved (`memfd:read+map`).
    pub fds: Vec<String>,
    /// True for allow.
    pub allowed: bool,
    /// Reason of a denial.
    pub reason: Option<String>,
    /// Similar records coalesced into this one ("+37 similar").
    pub similar: u32,
}

/// A batch of audit records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    /// The records.
    pub records: Vec<AuditRecord>,
    /// Pass as `since_seq` to get the next records.
    pub next_seq: u64,
}

/// Control-socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No socket file: the hub is not running (or runs elsewhere).
    #[error("no hub control socket at {0} (is bulkhead-hub running?)")]
    NoSocket(PathBuf),
    /// Socket I/O failed.
    #[error("hub control socket {path}: {what}: {errno}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Which step.
        what: &'static str,
        /// The error.
        errno: nix::Error,
    },
    /// The peer sent something that does not decode.
    #[error("hub control socket {path}: bad message: {err}")]
    Decode {
        /// The socket.
        path: PathBuf,
        /// The error.
        err: postcard::Error,
    },
    /// A message too large to send.
    #[error("control message of {0} bytes is larger than {MAX_MESSAGE}")]
    TooLarge(usize),
    /// The hub closed the connection without answering.
    #[error("hub control socket {0}: closed without an answer")]
    Closed(PathBuf),
    /// The process at the socket is not the hub (nor root, nor us).
    #[error(
        "hub control socket {path}: answered by uid {uid}, which is neither root, you, nor \
         the owner of the socket's directory (writable by its owner only): not trusted"
    )]
    UntrustedServer {
        /// The socket.
        path: PathBuf,
        /// The peer's uid.
        uid: u32,
    },
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, ControlError> {
    let bytes = postcard::to_stdvec(v).map_err(|err| ControlError::Decode {
        path: PathBuf::new(),
        err,
    })?;
    if bytes.len() > MAX_MESSAGE {
        return Err(ControlError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Encode a request (client side).
pub fn encode_request(r: &Request) -> Result<Vec<u8>, ControlError> {
    encode(r)
}

/// Encode a response (server side).
pub fn encode_response(r: &Response) -> Result<Vec<u8>, ControlError> {
    encode(r)
}

/// Decode a request datagram (server side; the bytes are untrusted).
pub fn decode_request(bytes: &[u8]) -> Result<Request, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Decode a response datagram (client side).
pub fn decode_response(bytes: &[u8]) -> Result<Response, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Who answers on the hub's control socket (SO_PEERCRED), checked before any answer is
/// trusted: root, the client's own uid, or the owner of the socket's directory when only
/// that owner can write there (the hub's runtime directory, made by init for the hub's
/// user). Anyone else could have put a socket at the path and would be refused.
fn check_server(fd: &OwnedFd, path: &Path) -> Result<(), ControlError> {
    use nix::sys::socket::{getsockopt, sockopt};
    use std::os::unix::fs::MetadataExt;
    let cred = getsockopt(fd, sockopt::PeerCredentials).map_err(|errno| ControlError::Io {
        path: path.to_path_buf(),
        what: "SO_PEERCRED",
        errno,
    })?;
    let uid = cred.uid();
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    if let Ok(meta) = std::fs::metadata(dir) {
        if meta.mode() & 0o022 == 0 && meta.uid() == uid {
            return Ok(());
        }
    }
    Err(ControlError::UntrustedServer {
        path: path.to_path_buf(),
        uid,
    })
}

/// A connection to the hub's control socket.
pub struct HubClient {
    fd: OwnedFd,
    path: PathBuf,
}

impl HubClient {
    /// Connect; a missing socket gives [`ControlError::NoSocket`] naming the path.
    pub fn connect(path: &Path) -> Result<HubClient, ControlError> {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(ControlError::NoSocket(path.to_path_buf()));
        }
        let io = |what| {
            move |errno| ControlError::Io {
                path: path.to_path_buf(),
                what,
                errno,
            }
        };
        let fd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io("socket"))?;
        let addr = UnixAddr::new(path).map_err(io("address"))?;
        connect(fd.as_raw_fd(), &addr).map_err(io("connect"))?;
        check_server(&fd, path)?;
        Ok(HubClient {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Send one request and wait for its response.
    pub fn request(&self, req: &Request) -> Result<Response, ControlError> {
        let io = |what| {
            move |errno| ControlError::Io {
                path: self.path.clone(),
                what,
                errno,
            }
        };
        let bytes = encode_request(req)?;
        send(self.fd.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL).map_err(io("send"))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io("recv"))?;
        if n == 0 {
            return Err(ControlError::Closed(self.path.clone()));
        }
        decode_response(buf.get(..n).unwrap_or(&[])).map_err(|err| ControlError::Decode {
            path: self.path.clone(),
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{accept, bind, listen, Backlog};
    use std::os::fd::FromRawFd;

    #[test]
    fn missing_socket_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hub.sock");
        let e = HubClient::connect(&p).err().unwrap();
        assert!(e.to_string().contains(&p.display().to_string()));
        assert!(matches!(e, ControlError::NoSocket(_)));
    }

    #[test]
    fn garbage_requests_do_not_decode() {
        assert!(decode_request(&[0xff, 0xff, 0xff]).is_err());
        assert!(decode_request(&[]).is_err());
    }

    /// A fake hub server (a thread answering one request) to exercise the real client and
    /// the real wire format.
    #[test]
    fn fake_hub_server_roundtrip_over_seqpacket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.sock");
        let lfd = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(lfd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&lfd, Backlog::new(1).unwrap()).unwrap();
        let server = std::thread::spawn(move || {
            let raw = accept(lfd.as_raw_fd()).unwrap();
            // SAFETY: `accept` just returned this fd and nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut buf = vec![0u8; MAX_MESSAGE];
            let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            let req = decode_request(&buf[..n]).unwrap();
            let resp = match req {
                Request::Status => Response::Status(StatusInfo {
                    generation: 7,
                    tree_hash: "sha256:ab".into(),
                    ..Default::default()
                }),
                _ => Response::Error {
                    message: "unexpected".into(),
                },
            };
            send(
                conn.as_raw_fd(),
                &encode_response(&resp).unwrap(),
                MsgFlags::empty(),
            )
            .unwrap();
        });
        let c = HubClient::connect(&path).unwrap();
        let r = c.request(&Request::Status).unwrap();
        server.join().unwrap();
        match r {
            Response::Status(s) => {
                assert_eq!((s.generation, s.tree_hash.as_str()), (7, "sha256:ab"))
            }
            other => panic!("{other:?}"),
        }
    }
}
