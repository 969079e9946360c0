//! The control socket `/run/bulkhead/init.sock`: SOCK_SEQPACKET, mode 0600, only uid 0 may
//! talk to it (SO_PEERCRED). Each datagram is a bulkhead-ipc frame holding one [`Request`];
//! init answers each with one [`Response`].
//!
//! The server side never blocks PID 1: connections are non-blocking, answers use
//! `try_send`, the number of connections is bounded, and a bad request gets an error reply
//! (or the connection is dropped), nothing more.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use bulkhead_ipc::{Channel, ChannelError, ChannelListener};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

/// Where init listens.
pub const SOCKET_PATH: &str = "/run/bulkhead/init.sock";

/// Most simultaneous control connections.
pub const MAX_CONNECTIONS: usize = 16;

/// Most requests handled per connection per wakeup (fairness).
const MAX_REQUESTS_PER_WAKEUP: usize = 8;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The supervised services.
    Status,
    /// Orderly power-off.
    Poweroff,
    /// Orderly reboot.
    Reboot,
}

/// One service in a status answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// `waiting`, `running`, `stopping`, `done`, `failed` or `stopped`.
    pub state: String,
    /// Live process id.
    pub pid: Option<i32>,
    /// Starts so far.
    pub starts: u32,
    /// How the last run ended, in words.
    pub last_exit: Option<String>,
}

/// What init answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Status`.
    Status {
        /// Every service, in configuration order.
        services: Vec<ServiceStatus>,
    },
    /// The request was accepted.
    Ok,
    /// The request was refused or malformed.
    Error(String),
}

/// Makes `dir` root's alone (owner 0:0, mode 0700, not a symlink): init's control socket
/// and the transient policy live there, where no service (the hub included) can replace
/// them.
pub fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if meta.uid() != 0 || meta.gid() != 0 {
        std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("{path}: {source}")]
    Channel {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: ChannelError,
    },
}

/// Sends one request and waits for the answer.
pub fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    let wrap = |source| ClientError::Channel {
        path: path.display().to_string(),
        source,
    };
    // Only root (init) or ourselves may answer: a socket someone else put there would
    // otherwise be trusted with a poweroff and its "Ok".
    let ch =
        Channel::connect_trusted(path, bulkhead_ipc::channel::TrustedServer::Root).map_err(wrap)?;
    ch.send(req, &[]).map_err(wrap)?;
    let (resp, _fds) = ch.recv::<Response>().map_err(wrap)?;
    Ok(resp)
}

/// What the event loop must do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Power off.
    Poweroff,
    /// Reboot.
    Reboot,
}

/// The listening socket and its connections.
#[derive(Debug)]
pub struct ControlServer {
    listener: ChannelListener,
    allowed_uid: u32,
    conns: Vec<Channel>,
}

/// Decides the answer to one request; `status` builds the status list on demand.
pub fn answer(
    req: &Request,
    status: impl FnOnce() -> Vec<ServiceStatus>,
) -> (Response, Option<Command>) {
    match req {
        Request::Status => (Response::Status { services: status() }, None),
        Request::Poweroff => (Response::Ok, Some(Command::Poweroff)),
        Request::Reboot => (Response::Ok, Some(Command::Reboot)),
    }
}

impl ControlServer {
    /// Creates the socket's directory if needed (it is shared with other Bulkhead
    /// sockets) and binds the socket with mode 0600.
    /// Only peers with `allowed_uid` (0 for PID 1) are served.
    pub fn bind(path: &Path, allowed_uid: u32) -> Result<ControlServer, ChannelError> {
        if let Some(dir) = path.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                warn!("cannot create {}: {e}", dir.display());
            }
        }
        let listener = ChannelListener::bind(path, 0o600)?;
        Ok(ControlServer {
            listener,
            allowed_uid,
            conns: Vec::new(),
        })
    }

    /// The fds to poll: the listener first, then each connection.
    pub fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.listener.as_fd()];
        fds.extend(self.conns.iter().map(|c| c.as_fd()));
        fds
    }

    /// Accepts pending connections, refusing peers that are not uid 0 and any beyond
    /// `MAX_CONNECTIONS`.
    pub fn accept_pending(&mut self) {
        loop {
            let ch = match self.listener.accept() {
                Ok(ch) => ch,
                Err(ChannelError::WouldBlock) => return,
                Err(e) => {
                    warn!("control socket: accept: {e}");
                    return;
                }
            };
            let uid = match ch.peer_credentials() {
                Ok(cred) => cred.uid,
                Err(e) => {
                    warn!("control socket: SO_PEERCRED: {e}");
                    continue;
                }
            };
            if uid != self.allowed_uid {
                warn!("control socket: refused connection from uid {uid}");
                let _ = ch.try_send(
                    &Response::Error(format!(
                        "permission denied: only uid {} may control init",
                        self.allowed_uid
                    )),
                    &[],
                );
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                warn!("control socket: too many connections, refusing one");
                let _ = ch.try_send(&Response::Error("too many connections".into()), &[]);
                continue;
            }
            self.conns.push(ch);
        }
    }

    /// Serves every readable connection. `status` builds a status list; returns the
    /// commands requested, in order.
    pub fn serve(
        &mut self,
        status: &mut dyn FnMut() -> Vec<ServiceStatus>,
        accept_commands: bool,
    ) -> Vec<Command> {
        let mut commands = Vec::new();
        let mut keep = Vec::with_capacity(self.conns.len());
        for ch in self.conns.drain(..) {
            let mut alive = true;
            for _ in 0..MAX_REQUESTS_PER_WAKEUP {
                match ch.try_recv::<Request>() {
                    Ok((req, _fds)) => {
                        debug!("control request {req:?}");
                        let (resp, cmd) = if accept_commands || req == Request::Status {
                            answer(&req, &mut *status)
                        } else {
                            (Response::Error("shutting down".into()), None)
                        };
                        if let Err(e) = ch.try_send(&resp, &[]) {
                            debug!("control socket: reply dropped: {e}");
                        }
                        commands.extend(cmd);
                    }
                    Err(ChannelError::WouldBlock) => break,
                    Err(ChannelError::Closed) => {
                        alive = false;
                        break;
                    }
                    Err(e) => {
                        warn!("control socket: bad request: {e}");
                        if ch
                            .try_send(&Response::Error(format!("bad request: {e}")), &[])
                            .is_err()
                        {
                            alive = false;
                            break;
                        }
                    }
                }
            }
            if alive {
                keep.push(ch);
            }
        }
        self.conns = keep;
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<ServiceStatus> {
        vec![ServiceStatus {
            name: "hello".into(),
            state: "running".into(),
            pid: Some(42),
            starts: 3,
            last_exit: Some("exited with status 1".into()),
        }]
    }

    #[test]
    fn protocol_round_trip_over_a_real_channel() {
        let (client, server) = Channel::pair().unwrap();
        for req in [Request::Status, Request::Poweroff, Request::Reboot] {
            client.send(&req, &[]).unwrap();
            let (got, fds) = server.recv::<Request>().unwrap();
            assert_eq!(got, req);
            assert!(fds.is_empty());
            let (resp, _) = answer(&got, sample);
            server.send(&resp, &[]).unwrap();
            assert_eq!(client.recv::<Response>().unwrap().0, resp);
        }
        let err = Response::Error("nope".into());
        server.send(&err, &[]).unwrap();
        assert_eq!(client.recv::<Response>().unwrap().0, err);
    }

    #[test]
    fn answers() {
        assert_eq!(
            answer(&Request::Status, sample),
            (Response::Status { services: sample() }, None)
        );
        assert_eq!(
            answer(&Request::Poweroff, Vec::new),
            (Response::Ok, Some(Command::Poweroff))
        );
        assert_eq!(
            answer(&Request::Reboot, Vec::new),
            (Response::Ok, Some(Command::Reboot))
        );
    }

    #[test]
    fn server_answers_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/init.sock");
        let euid = nix::unistd::geteuid().as_raw();
        // A server that admits another uid refuses us with an error reply.
        {
            let mut strict = ControlServer::bind(&path, euid.wrapping_add(1)).unwrap();
            let client = Channel::connect(&path).unwrap();
            strict.accept_pending();
            let (resp, _) = client.recv::<Response>().unwrap();
            assert!(matches!(resp, Response::Error(m) if m.contains("permission denied")));
            assert_eq!(strict.poll_fds().len(), 1);
        }
        let mut server = ControlServer::bind(&path, euid).unwrap();
        let client = Channel::connect(&path).unwrap();
        server.accept_pending();
        // Garbage first: an error reply, and the server carries on.
        client
            .send_raw(&[9, 9, 9], &[], nix::sys::socket::MsgFlags::empty())
            .unwrap();
        client.send(&Request::Status, &[]).unwrap();
        client.send(&Request::Reboot, &[]).unwrap();
        let cmds = server.serve(&mut sample, true);
        assert_eq!(cmds, vec![Command::Reboot]);
        assert!(
            matches!(client.recv::<Response>().unwrap().0, Response::Error(m) if m.contains("bad request"))
        );
        assert_eq!(
            client.recv::<Response>().unwrap().0,
            Response::Status { services: sample() }
        );
        assert_eq!(client.recv::<Response>().unwrap().0, Response::Ok);
        // While stopping, only status is served.
        client.send(&Request::Poweroff, &[]).unwrap();
        assert!(server.serve(&mut sample, false).is_empty());
        assert!(matches!(
            client.recv::<Response>().unwrap().0,
            Response::Error(_)
        ));
        // A closed client is dropped.
        drop(client);
        server.serve(&mut sample, true);
        assert_eq!(server.poll_fds().len(), 1);
    }
}
