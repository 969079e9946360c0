//! Init's control sockets: `/run/bulkhead/init.sock` (root only, in init's root-only
//! directory) and, when `[control] read_group` names a group, `/run/bulkhead-read/init.sock`
//! (that group, read-only requests only). SOCK_SEQPACKET; each datagram is a bulkhead-ipc
//! frame holding one [`Request`] ([`protocol`]); init answers each with one [`Response`].
//!
//! The server side never blocks PID 1: connections are non-blocking, answers use
//! `try_send`, the number of connections is bounded, and a bad request gets an error reply
//! (or the connection is dropped), nothing more.

pub mod protocol;

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use bulkhead_ipc::{Channel, ChannelError, ChannelListener};
use log::{debug, warn};

pub use protocol::{
    answer, Access, Command, Entry, Handler, Kind, ListPage, LogFrom, LogLine, LogPage, Op,
    Request, Response, ServiceStatus,
};

/// Where init listens (root only).
pub const SOCKET_PATH: &str = "/run/bulkhead/init.sock";

/// The read-only socket's directory (root:<read_group>, 0750).
pub const READ_DIR: &str = "/run/bulkhead-read";

/// Where init listens for `[control] read_group` (read-only requests).
pub const READ_SOCKET_PATH: &str = "/run/bulkhead-read/init.sock";

/// Most simultaneous control connections (both sockets together).
pub const MAX_CONNECTIONS: usize = 16;

/// Most requests handled per connection per wakeup (fairness).
const MAX_REQUESTS_PER_WAKEUP: usize = 8;

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
    /// No answer in time.
    #[error("{path}: no answer within {} s", ANSWER_TIMEOUT.as_secs())]
    Timeout {
        /// The socket.
        path: String,
    },
}

/// A connection to init's control socket, its server checked (SO_PEERCRED: root, or
/// this very uid) before anything is sent.
#[derive(Debug)]
pub struct Client {
    ch: Channel,
    path: String,
}

/// How long a client waits for an answer (init answers at once or never).
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let wrap = |source| ClientError::Channel {
            path: path.display().to_string(),
            source,
        };
        // Only root (init) or ourselves may answer: a socket someone else put there would
        // otherwise be trusted with a poweroff and its "Ok".
        let ch = Channel::connect_trusted(path, bulkhead_ipc::channel::TrustedServer::Root)
            .map_err(wrap)?;
        Ok(Client {
            ch,
            path: path.display().to_string(),
        })
    }

    /// Sends one request and waits (at most [`ANSWER_TIMEOUT`]) for its answer.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let wrap = |source| ClientError::Channel {
            path: self.path.clone(),
            source,
        };
        self.ch.send(req, &[]).map_err(wrap)?;
        let mut fds = [nix::poll::PollFd::new(
            self.ch.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(ANSWER_TIMEOUT.as_millis()).unwrap_or(u16::MAX);
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
            Ok(0) => {
                return Err(ClientError::Timeout {
                    path: self.path.clone(),
                })
            }
            Ok(_) => {}
            Err(e) => {
                return Err(wrap(ChannelError::Sys {
                    op: "poll",
                    errno: e,
                }))
            }
        }
        let (resp, _fds) = self.ch.recv::<Response>().map_err(wrap)?;
        Ok(resp)
    }
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

/// SIGKILLs the running process of init's service `service`, found through init's control
/// socket (fault injection for tests: a VM's VMM killed mid-run). Returns its pid.
pub fn kill_service(service: &str) -> Result<i32, String> {
    let answer = request(Path::new(SOCKET_PATH), &Request::Status).map_err(|e| e.to_string())?;
    let Response::Status { services } = answer else {
        return Err(format!("init answered {answer:?}"));
    };
    let pid = services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.pid)
        .ok_or_else(|| format!("{service} is not running"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill {pid}: {e}"))?;
    Ok(pid)
}

/// One listening socket and who is admitted there.
#[derive(Debug)]
struct Listener {
    sock: ChannelListener,
    access: Access,
    /// Only this peer uid (the root-only socket); `None`: whoever the directory lets in.
    uid: Option<u32>,
}

/// The listening sockets and their connections.
#[derive(Debug)]
pub struct ControlServer {
    listeners: Vec<Listener>,
    conns: Vec<(Channel, Access)>,
}

impl ControlServer {
    /// Creates the socket's directory if needed and binds the socket with mode 0600.
    /// Only peers with `allowed_uid` (0 for PID 1) are served, with full access.
    pub fn bind(path: &Path, allowed_uid: u32) -> Result<ControlServer, ChannelError> {
        if let Some(dir) = path.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                warn!("cannot create {}: {e}", dir.display());
            }
        }
        let sock = ChannelListener::bind(path, 0o600)?;
        Ok(ControlServer {
            listeners: vec![Listener {
                sock,
                access: Access::Full,
                uid: Some(allowed_uid),
            }],
            conns: Vec::new(),
        })
    }

    /// Adds the read-only socket at `path`: its directory is made root:`gid`, mode 0750
    /// (not a symlink), and the socket 0660 root:`gid`, so members of the group (and root)
    /// can connect; they may only read (`ls`, `log`).
    pub fn add_read_only(&mut self, path: &Path, gid: u32) -> Result<(), String> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = path
            .parent()
            .ok_or_else(|| format!("{}: no directory", path.display()))?;
        let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(|e| err("mkdir", e))?;
        let meta = std::fs::symlink_metadata(dir).map_err(|e| err("stat", e))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        // Closed first, then handed to the group: never open to anyone else meanwhile.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("chmod", e))?;
        if meta.uid() != 0 || meta.gid() != gid {
            std::os::unix::fs::chown(dir, Some(0), Some(gid)).map_err(|e| err("chown", e))?;
        }
        let sock = ChannelListener::bind(path, 0o660).map_err(|e| e.to_string())?;
        std::os::unix::fs::chown(path, Some(0), Some(gid))
            .map_err(|e| format!("chown {}: {e}", path.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
            .map_err(|e| err("chmod", e))?;
        self.listeners.push(Listener {
            sock,
            access: Access::ReadOnly,
            uid: None,
        });
        Ok(())
    }

    /// The fds to poll: the listeners first, then each connection.
    pub fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.sock.as_fd()).collect();
        fds.extend(self.conns.iter().map(|(c, _)| c.as_fd()));
        fds
    }

    /// Accepts pending connections on every listener, refusing peers the listener does
    /// not admit and any beyond `MAX_CONNECTIONS`.
    pub fn accept_pending(&mut self) {
        for l in &self.listeners {
            loop {
                let ch = match l.sock.accept() {
                    Ok(ch) => ch,
                    Err(ChannelError::WouldBlock) => break,
                    Err(e) => {
                        warn!("control socket: accept: {e}");
                        break;
                    }
                };
                let uid = match ch.peer_credentials() {
                    Ok(cred) => cred.uid,
                    Err(e) => {
                        warn!("control socket: SO_PEERCRED: {e}");
                        continue;
                    }
                };
                if let Some(allowed) = l.uid {
                    if uid != allowed {
                        warn!("control socket: refused connection from uid {uid}");
                        let _ = ch.try_send(
                            &Response::Error(format!(
                                "permission denied: only uid {allowed} may control init"
                            )),
                            &[],
                        );
                        continue;
                    }
                }
                if self.conns.len() >= MAX_CONNECTIONS {
                    warn!("control socket: too many connections, refusing one");
                    let _ = ch.try_send(&Response::Error("too many connections".into()), &[]);
                    continue;
                }
                if l.access == Access::ReadOnly {
                    debug!("control socket: read-only client uid {uid}");
                }
                self.conns.push((ch, l.access));
            }
        }
    }

    /// Accepts new clients if a listener is ready, then serves every readable connection
    /// (`ready` in the order of [`Self::poll_fds`]). Returns the power commands requested,
    /// in order. `accepting`: false while shutting down (read-only requests only).
    pub fn serve(
        &mut self,
        ready: &[bool],
        handler: &mut dyn Handler,
        accepting: bool,
    ) -> Vec<Command> {
        let n = self.listeners.len();
        if ready.iter().take(n).any(|r| *r) {
            self.accept_pending();
        }
        let mut commands = Vec::new();
        let mut keep = Vec::with_capacity(self.conns.len());
        for (ch, access) in self.conns.drain(..) {
            let mut alive = true;
            for _ in 0..MAX_REQUESTS_PER_WAKEUP {
                match ch.try_recv::<Request>() {
                    Ok((req, _fds)) => {
                        debug!("control request {req:?}");
                        let (resp, cmd) = answer(req, access, accepting, handler);
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
                keep.push((ch, access));
            }
        }
        self.conns = keep;
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler over a fixed list: records the operations it was asked for.
    #[derive(Default)]
    struct Fake {
        ops: Vec<(Op, String)>,
    }

    fn sample() -> Vec<ServiceStatus> {
        vec![ServiceStatus {
            name: "hello".into(),
            state: "running".into(),
            pid: Some(42),
            starts: 3,
            last_exit: Some("exited with status 1".into()),
        }]
    }

    impl Handler for Fake {
        fn status(&self) -> Vec<ServiceStatus> {
            sample()
        }
        fn list(&self, from: u32) -> ListPage {
            ListPage {
                next: if from == 0 { Some(1) } else { None },
                boot_ms: u64::from(from),
                ..ListPage::default()
            }
        }
        fn log(&self, name: &str, _from: LogFrom) -> Result<LogPage, String> {
            if name == "hello" {
                Ok(LogPage::default())
            } else {
                Err(format!("no service {name:?}"))
            }
        }
        fn operate(&mut self, op: Op, name: &str) -> Result<String, String> {
            self.ops.push((op, name.to_string()));
            Ok(format!("{op:?} {name}"))
        }
    }

    #[test]
    fn protocol_round_trip_over_a_real_channel() {
        let (client, server) = Channel::pair().unwrap();
        let reqs = [
            Request::Status,
            Request::Poweroff,
            Request::Reboot,
            Request::List { from: 7 },
            Request::Start("a".into()),
            Request::Stop("b".into()),
            Request::Restart("c".into()),
            Request::ResetFailed("d".into()),
            Request::Log {
                name: "hello".into(),
                from: LogFrom::After(3),
            },
        ];
        let mut fake = Fake::default();
        for req in reqs {
            client.send(&req, &[]).unwrap();
            let (got, fds) = server.recv::<Request>().unwrap();
            assert_eq!(got, req);
            assert!(fds.is_empty());
            let (resp, _) = answer(got, Access::Full, true, &mut fake);
            server.send(&resp, &[]).unwrap();
            assert_eq!(client.recv::<Response>().unwrap().0, resp);
        }
        assert_eq!(fake.ops.len(), 4);
    }

    /// The wire tags are the documented ones (a client of another build still talks).
    #[test]
    fn tags_never_move() {
        let tag = |r: &Request| bulkhead_ipc::frame::encode(r).unwrap()[1];
        assert_eq!(tag(&Request::Status), 0);
        assert_eq!(tag(&Request::Reboot), 2);
        assert_eq!(tag(&Request::List { from: 0 }), 3);
        assert_eq!(tag(&Request::ResetFailed(String::new())), 7);
        assert_eq!(
            tag(&Request::Log {
                name: String::new(),
                from: LogFrom::Tail(1)
            }),
            8
        );
        let rtag = |r: &Response| bulkhead_ipc::frame::encode(r).unwrap()[1];
        assert_eq!(rtag(&Response::Error(String::new())), 2);
        assert_eq!(rtag(&Response::Done(String::new())), 4);
        assert_eq!(rtag(&Response::Log(LogPage::default())), 5);
    }

    #[test]
    fn answers_and_who_may_ask_what() {
        let mut fake = Fake::default();
        assert_eq!(
            answer(Request::Status, Access::Full, true, &mut fake),
            (Response::Status { services: sample() }, None)
        );
        assert_eq!(
            answer(Request::Poweroff, Access::Full, true, &mut fake),
            (Response::Ok, Some(Command::Poweroff))
        );
        // The read-only socket reads, and is refused everything else.
        assert!(matches!(
            answer(Request::List { from: 0 }, Access::ReadOnly, true, &mut fake).0,
            Response::List(_)
        ));
        assert!(matches!(
            answer(
                Request::Log { name: "nope".into(), from: LogFrom::Tail(5) },
                Access::ReadOnly,
                true,
                &mut fake
            )
            .0,
            Response::Error(m) if m.contains("nope")
        ));
        for req in [
            Request::Poweroff,
            Request::Reboot,
            Request::Stop("hello".into()),
            Request::Start("hello".into()),
            Request::Restart("hello".into()),
            Request::ResetFailed("hello".into()),
        ] {
            let (resp, cmd) = answer(req, Access::ReadOnly, true, &mut fake);
            assert!(matches!(resp, Response::Error(m) if m.contains("permission denied")));
            assert_eq!(cmd, None);
        }
        assert!(fake.ops.is_empty(), "a read-only client changed something");
        // While shutting down only reads are served.
        let (resp, cmd) = answer(
            Request::Stop("hello".into()),
            Access::Full,
            false,
            &mut fake,
        );
        assert_eq!(resp, Response::Error("shutting down".into()));
        assert_eq!(cmd, None);
        assert!(fake.ops.is_empty());
        assert!(matches!(
            answer(Request::List { from: 1 }, Access::Full, false, &mut fake).0,
            Response::List(p) if p.boot_ms == 1
        ));
    }

    #[test]
    fn server_answers_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/init.sock");
        let euid = nix::unistd::geteuid().as_raw();
        let mut fake = Fake::default();
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
        // Garbage first: an error reply, and the server carries on.
        client
            .send_raw(&[9, 9, 9], &[], nix::sys::socket::MsgFlags::empty())
            .unwrap();
        client.send(&Request::Status, &[]).unwrap();
        client.send(&Request::Reboot, &[]).unwrap();
        let cmds = server.serve(&[true], &mut fake, true);
        assert_eq!(cmds, vec![Command::Reboot]);
        assert!(
            matches!(client.recv::<Response>().unwrap().0, Response::Error(m) if m.contains("bad request"))
        );
        assert_eq!(
            client.recv::<Response>().unwrap().0,
            Response::Status { services: sample() }
        );
        assert_eq!(client.recv::<Response>().unwrap().0, Response::Ok);
        // While stopping, only reads are served.
        client.send(&Request::Poweroff, &[]).unwrap();
        assert!(server.serve(&[false, true], &mut fake, false).is_empty());
        assert!(matches!(
            client.recv::<Response>().unwrap().0,
            Response::Error(_)
        ));
        // A closed client is dropped.
        drop(client);
        server.serve(&[false, true], &mut fake, true);
        assert_eq!(server.poll_fds().len(), 1);
    }

    /// The read-only socket: in a directory of its group, 0660; a client there may list
    /// but not stop.
    #[test]
    fn read_only_socket_reads_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let euid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let mut server = ControlServer::bind(&dir.path().join("rw/init.sock"), euid).unwrap();
        let ro = dir.path().join("ro/init.sock");
        if euid == 0 {
            server.add_read_only(&ro, 4242).unwrap();
            let meta = std::fs::metadata(ro.parent().unwrap()).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 4242));
            assert_eq!(meta.permissions().mode() & 0o777, 0o750);
            assert_eq!(std::fs::metadata(&ro).unwrap().gid(), 4242);
        } else {
            // Without root the chown to another group fails: try our own group.
            server.add_read_only(&ro, gid).unwrap_or_else(|e| {
                assert!(e.contains("chown"), "{e}");
            });
            if !ro.exists() {
                return;
            }
        }
        let client = Channel::connect(&ro).unwrap();
        let mut fake = Fake::default();
        client.send(&Request::Stop("hello".into()), &[]).unwrap();
        client.send(&Request::List { from: 0 }, &[]).unwrap();
        let fds = server.poll_fds().len();
        assert_eq!(fds, 2, "two listeners");
        server.serve(&[false, true], &mut fake, true);
        assert!(matches!(
            client.recv::<Response>().unwrap().0,
            Response::Error(m) if m.contains("read-only")
        ));
        assert!(matches!(
            client.recv::<Response>().unwrap().0,
            Response::List(_)
        ));
        assert!(fake.ops.is_empty());
    }
}
