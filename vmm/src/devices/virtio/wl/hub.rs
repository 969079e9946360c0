//! The VMM's side of its hub VM channel (`--hub-fd`): name resolution through the hub for
//! NEW_CTX_NAMED, the faux accept, and `Release`.
//!
//! - `listen:<service>` → `VmRequest::Provide`. On `Provided` the guest gets a **listener
//!   context**: one end of a socketpair; the VMM keeps the other end for the service until
//!   the guest closes the vfd ([`HubLink::drop_listener`]). The VM stays the service's
//!   provider until it says `Hello` again (the hub has no "unprovide"), so a later
//!   `listen:<service>` is served here without asking the hub again: a guest that opens and
//!   closes listener contexts in a loop grows neither the VMM's fds nor the hub's audit log.
//! - `HubEvent::Accept { service, conn, name }` (+ the connection fd): `name` is added to the
//!   socket registry as a [`WlSocket::Hub`], and `name\n` is written to the service's
//!   listener end. The guest reads the name and connects to it (`bulkhead-wl`'s `Listener`).
//! - `<service>` or `<service>@<provider>` → `VmRequest::Connect`; `Connected` gives a
//!   [`HubConn`] for a hub vfd.
//! - Any refusal, a timeout, or a hub that is gone: [`HubError`], which the device answers
//!   with `RESP_ERR`, the same as an unknown name (the reason is logged at info).
//!
//! Answers are matched by `tag`; events that arrive while a request waits (another
//! connection's `Accept`, `Closed`) are handled on the way. The wait is bounded
//! ([`HubLink::set_answer_timeout`], 10 s by default), so a hub that stopped answering never
//! hangs the guest for long. On EOF the link is dead for good: logged once, and every later
//! hub name gets `RESP_ERR`; the VM keeps running.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::client::HubConn;
use bulkhead_ipc::hub::protocol::{ConnId, HubEvent, Name, Refusal, VmRequest, MAX_NAME};

use super::sockets::{WlSocket, WlSockets};

/// Names one listener context of the link (see [`HubLink::drop_listener`]).
pub type ListenerId = u64;

/// Prefix of a guest name that asks to provide a service.
pub const LISTEN_PREFIX: &str = "listen:";
/// How long a request waits for the hub's answer by default.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a name could not be resolved through the hub (the guest sees `RESP_ERR` for all).
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The hub refused (policy, no such service, provider not running, quota...).
    #[error("hub refused {what}: {error:?}")]
    Refused {
        /// The request.
        what: String,
        /// The hub's uniform reason.
        error: Refusal,
    },
    /// The name is not a valid service name.
    #[error("{0:?} is not a valid service name")]
    BadName(String),
    /// No answer in time.
    #[error("no answer from the hub for {0} in time")]
    Timeout(String),
    /// The hub closed the channel (or it failed).
    #[error("the hub is gone")]
    Gone,
    /// The hub answered with something that does not fit the request.
    #[error("unexpected answer from the hub: {0}")]
    Protocol(String),
    /// A local resource (socketpair) failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// Errors setting up the link.
#[derive(Debug, thiserror::Error)]
pub enum HubLinkError {
    /// The fd is not a socket, or not SOCK_SEQPACKET.
    #[error("hub fd {fd} is not a SOCK_SEQPACKET socket{detail}")]
    NotSeqpacket {
        /// The fd.
        fd: i32,
        /// What it is instead.
        detail: String,
    },
    /// Sending `Hello` failed.
    #[error("hub channel: {0}")]
    Channel(#[from] ChannelError),
}

/// What a guest name means to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubName {
    /// `listen:<service>`.
    Provide(Name),
    /// `<service>` or `<service>@<provider>`.
    Connect(Name, Option<Name>),
}

fn service_name(s: &str, whole: &str) -> Result<Name, HubError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME
        && !s.contains(['\0', '\n', '@', '%'])
        && !s.starts_with(LISTEN_PREFIX);
    if !ok {
        return Err(HubError::BadName(whole.to_string()));
    }
    Name::try_from(s).map_err(|_| HubError::BadName(whole.to_string()))
}

/// Parses a guest name as a hub request.
pub fn parse_hub_name(name: &str) -> Result<HubName, HubError> {
    if let Some(svc) = name.strip_prefix(LISTEN_PREFIX) {
        return Ok(HubName::Provide(service_name(svc, name)?));
    }
    match name.split_once('@') {
        Some((svc, prov)) => Ok(HubName::Connect(
            service_name(svc, name)?,
            Some(service_name(prov, name)?),
        )),
        None => Ok(HubName::Connect(service_name(name, name)?, None)),
    }
}

/// Checks that `fd` is a SOCK_SEQPACKET socket.
pub fn check_seqpacket(fd: BorrowedFd<'_>) -> Result<(), HubLinkError> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, which is a c_int.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(HubLinkError::NotSeqpacket {
            fd: fd.as_raw_fd(),
            detail: format!(" ({})", std::io::Error::last_os_error()),
        });
    }
    if ty != libc::SOCK_SEQPACKET {
        return Err(HubLinkError::NotSeqpacket {
            fd: fd.as_raw_fd(),
            detail: format!(" (socket type {ty})"),
        });
    }
    Ok(())
}

/// The VM channel to the hub and what hangs off it.
pub struct HubLink {
    chan: Channel,
    sockets: WlSockets,
    next_tag: u32,
    dead: bool,
    timeout: Duration,
    /// The VMM's ends of the guest's listener contexts, each with its service, in the order
    /// they were opened.
    listeners: BTreeMap<ListenerId, (String, UnixStream)>,
    next_listener: ListenerId,
    /// Services the hub registered this VM as the provider of since the last `Hello`.
    provided: BTreeSet<String>,
    /// Faux-accepted connections not yet taken by the guest: conn → registry name.
    accepted: BTreeMap<ConnId, String>,
}

/// The answer a request waits for.
enum Answer {
    Provided,
    Connected(ConnId, Vec<OwnedFd>),
    Shm(u64, Vec<OwnedFd>),
}

impl HubLink {
    /// Adopts the VM channel (checked to be SOCK_SEQPACKET) and tells the hub this VMM
    /// (re)started (`Hello`: the hub forgets this VM's earlier services and connections).
    pub fn new(fd: OwnedFd, sockets: WlSockets) -> Result<Self, HubLinkError> {
        check_seqpacket(fd.as_fd())?;
        let chan = Channel::from_fd(fd);
        chan.set_nonblocking(true)?;
        let link = Self {
            chan,
            sockets,
            next_tag: 1,
            dead: false,
            timeout: DEFAULT_ANSWER_TIMEOUT,
            listeners: BTreeMap::new(),
            next_listener: 0,
            provided: BTreeSet::new(),
            accepted: BTreeMap::new(),
        };
        link.send(&VmRequest::Hello)?;
        Ok(link)
    }

    /// Sets how long a request waits for its answer.
    pub fn set_answer_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// True once the hub closed the channel.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// The channel fd for the worker's poll set (None once dead).
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        (!self.dead).then(|| self.chan.as_fd())
    }

    /// Listener contexts open now (the VMM's ends of their socketpairs), all services.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    /// The guest closed listener context `id`: its socketpair end goes (a no-op if the link
    /// already forgot it: reset, hub gone).
    pub fn drop_listener(&mut self, id: ListenerId) {
        self.listeners.remove(&id);
    }

    /// Sends with a bounded wait for room (the hub drains VM channels promptly).
    fn send(&self, req: &VmRequest) -> Result<(), ChannelError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.chan.try_send(req, &[]) {
                Err(ChannelError::WouldBlock) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ChannelError::WouldBlock);
                    }
                    wait_for(self.chan.as_fd(), libc::POLLOUT, left);
                }
                r => return r,
            }
        }
    }

    fn mark_dead(&mut self, why: &str) {
        if !self.dead {
            log::warn!(
                "bulkhead-vmm: virtio-wl: the hub channel closed ({why}); hub names now get RESP_ERR"
            );
        }
        self.dead = true;
        self.listeners.clear();
        self.provided.clear();
        for (_, name) in std::mem::take(&mut self.accepted) {
            self.sockets.remove_hub(&name);
        }
    }

    /// Forgets listener contexts and unconsumed accepts and says `Hello` again (device
    /// reset: the guest's vfds are gone).
    pub fn reset(&mut self) {
        self.listeners.clear();
        self.provided.clear();
        for (_, name) in std::mem::take(&mut self.accepted) {
            self.sockets.remove_hub(&name);
        }
        if !self.dead {
            if let Err(e) = self.send(&VmRequest::Hello) {
                log::warn!("bulkhead-vmm: virtio-wl: hub Hello: {e}");
            }
        }
    }

    /// Tells the hub this VM closed its last fd to `(dev, ino)`.
    pub fn release(&mut self, key: (u64, u64)) {
        if self.dead {
            return;
        }
        let req = VmRequest::Release {
            dev: key.0,
            ino: key.1,
        };
        match self.send(&req) {
            Ok(()) => {}
            Err(ChannelError::Closed) => self.mark_dead("release"),
            Err(e) => log::warn!("bulkhead-vmm: virtio-wl: hub release: {e}"),
        }
    }

    /// Handles every event queued on the channel now (Accept, Closed, stray answers).
    pub fn poll_events(&mut self) {
        while !self.dead {
            match self.chan.try_recv::<HubEvent>() {
                Ok((ev, fds)) => self.event(ev, fds),
                Err(ChannelError::WouldBlock) => return,
                Err(e) => self.channel_error(e),
            }
        }
    }

    fn channel_error(&mut self, e: ChannelError) {
        match e {
            ChannelError::Closed | ChannelError::Sys { .. } => self.mark_dead(&e.to_string()),
            // A bad frame was consumed (and its fds closed) by the channel.
            e => log::warn!("bulkhead-vmm: virtio-wl: bad frame from the hub: {e}"),
        }
    }

    /// Resolves a guest name through the hub: a listener context for `listen:` names, a
    /// hub connection otherwise.
    pub fn resolve(&mut self, name: &str) -> Result<Resolved, HubError> {
        match parse_hub_name(name)? {
            HubName::Provide(service) => self
                .provide(&service)
                .map(|(stream, id)| Resolved::Listener { stream, id }),
            HubName::Connect(service, provider) => self
                .connect(&service, provider.as_ref())
                .map(Resolved::Conn),
        }
    }

    /// A listener context for `service`: asks the hub the first time (`Provide`), then
    /// serves later ones from `provided`.
    fn provide(&mut self, service: &Name) -> Result<(UnixStream, ListenerId), HubError> {
        if self.dead {
            return Err(HubError::Gone);
        }
        if !self.provided.contains(service.as_str()) {
            let tag = self.tag();
            let what = format!("provide {service}");
            self.request(
                &VmRequest::Provide {
                    tag,
                    service: service.clone(),
                },
                tag,
                &what,
            )?;
            self.provided.insert(service.to_string());
        }
        let (guest, ours) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        // The listener context only carries names to the guest: what the guest writes to it
        // fails (EPIPE → RESP_ERR) instead of filling a buffer nobody reads.
        ours.shutdown(std::net::Shutdown::Read)?;
        let id = self.next_listener;
        self.next_listener = self.next_listener.wrapping_add(1);
        self.listeners.insert(id, (service.to_string(), ours));
        Ok((guest, id))
    }

    fn connect(&mut self, service: &Name, provider: Option<&Name>) -> Result<HubConn, HubError> {
        let tag = self.tag();
        let what = match provider {
            Some(p) => format!("connect {service}@{p}"),
            None => format!("connect {service}"),
        };
        let answer = self.request(
            &VmRequest::Connect {
                tag,
                service: service.clone(),
                provider: provider.cloned(),
            },
            tag,
            &what,
        )?;
        match answer {
            Answer::Connected(conn, fds) => {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| HubError::Protocol(format!("Connected {conn} without an fd")))?;
                HubConn::from_fd(fd).map_err(|e| HubError::Protocol(e.to_string()))
            }
            Answer::Provided | Answer::Shm(..) => {
                Err(HubError::Protocol(format!("a wrong answer for {what}")))
            }
        }
    }

    /// Shared memory for the guest from the hub's memfd server, charged to this VM against
    /// the policy's `quota shm= shm-count=` until the last holder closes it: a sealed memfd
    /// of at least `size` bytes.
    pub fn alloc_shm(&mut self, size: u64) -> Result<OwnedFd, HubError> {
        let tag = self.tag();
        let what = format!("{size} bytes of shared memory");
        match self.request(&VmRequest::AllocShm { tag, size }, tag, &what)? {
            Answer::Shm(got, fds) if got >= size => fds.into_iter().next().ok_or_else(|| {
                HubError::Protocol(format!("ShmAllocated for {what} without an fd"))
            }),
            Answer::Shm(got, _) => Err(HubError::Protocol(format!(
                "ShmAllocated {got} bytes for {what}"
            ))),
            Answer::Provided | Answer::Connected(..) => {
                Err(HubError::Protocol(format!("a wrong answer for {what}")))
            }
        }
    }

    fn tag(&mut self) -> u32 {
        let t = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        t
    }

    /// Sends `req` and waits (bounded) for the answer tagged `tag`, handling other events.
    fn request(&mut self, req: &VmRequest, tag: u32, what: &str) -> Result<Answer, HubError> {
        if self.dead {
            return Err(HubError::Gone);
        }
        match self.send(req) {
            Ok(()) => {}
            Err(ChannelError::Closed) => {
                self.mark_dead("send");
                return Err(HubError::Gone);
            }
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.chan.try_recv::<HubEvent>() {
                Ok((ev, fds)) => match ev {
                    HubEvent::Provided { tag: t } if t == tag => return Ok(Answer::Provided),
                    HubEvent::Connected { tag: t, conn } if t == tag => {
                        return Ok(Answer::Connected(conn, fds))
                    }
                    HubEvent::ShmAllocated { tag: t, size } if t == tag => {
                        return Ok(Answer::Shm(size, fds))
                    }
                    HubEvent::Refused { tag: t, error } if t == tag => {
                        return Err(HubError::Refused {
                            what: what.to_string(),
                            error,
                        })
                    }
                    ev => self.event(ev, fds),
                },
                Err(ChannelError::WouldBlock) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(HubError::Timeout(what.to_string()));
                    }
                    wait_for(self.chan.as_fd(), libc::POLLIN, left);
                }
                Err(e) => {
                    self.channel_error(e);
                    if self.dead {
                        return Err(HubError::Gone);
                    }
                }
            }
        }
    }

    /// An event that is not the answer being waited for.
    fn event(&mut self, ev: HubEvent, fds: Vec<OwnedFd>) {
        match ev {
            HubEvent::Accept {
                service,
                conn,
                name,
            } => {
                let Some(fd) = fds.into_iter().next() else {
                    log::warn!("bulkhead-vmm: virtio-wl: hub Accept {conn} without an fd");
                    return;
                };
                self.accept(&service, conn, &name, fd);
            }
            HubEvent::Closed { conn, .. } => {
                // The connection's own socket reports EOF (the guest's vfd gets VFD_HUP);
                // here only an accept the guest never took is dropped.
                if let Some(name) = self.accepted.remove(&conn) {
                    if self.sockets.remove_hub(&name) {
                        log::debug!(
                            "bulkhead-vmm: virtio-wl: {name} closed before the guest took it"
                        );
                    }
                }
            }
            // A late answer to a request that timed out: its fds (a connection) close here,
            // which closes the connection at the hub.
            HubEvent::Connected { conn, .. } => {
                log::info!("bulkhead-vmm: virtio-wl: late Connected {conn} from the hub dropped");
            }
            HubEvent::Refused { tag: 0, error } => {
                log::warn!("bulkhead-vmm: virtio-wl: the hub rejected a request: {error:?}");
            }
            other => log::debug!("bulkhead-vmm: virtio-wl: stray hub event {other:?}"),
        }
    }

    /// The faux accept: register `name` backed by the connection and announce it on the
    /// service's listener context.
    fn accept(&mut self, service: &str, conn: ConnId, name: &str, fd: OwnedFd) {
        let hc = match HubConn::from_fd(fd) {
            Ok(h) => h,
            Err(e) => {
                log::warn!("bulkhead-vmm: virtio-wl: hub connection {conn}: {e}");
                return;
            }
        };
        // If someone registered that name by hand, a fresh `<name>-N` is used instead.
        let wanted = if self.sockets.contains(name) {
            format!("{name}-%d")
        } else {
            name.to_string()
        };
        match self.sockets.add(&wanted, WlSocket::Hub(hc)) {
            Ok(chosen) => self.announce(service, conn, chosen),
            Err(e) => {
                log::warn!("bulkhead-vmm: virtio-wl: cannot add {name}: {e}; connection dropped")
            }
        }
    }

    fn announce(&mut self, service: &str, conn: ConnId, name: String) {
        let line = format!("{name}\n");
        let mut announced = false;
        let mut closed = Vec::new();
        // The first listener that takes the line gets the connection; closed ones go.
        for (id, (_, end)) in self.listeners.iter_mut().filter(|(_, (s, _))| s == service) {
            match end.write(line.as_bytes()) {
                Ok(n) if n == line.len() => {
                    announced = true;
                    break;
                }
                Ok(_) => log::warn!("bulkhead-vmm: virtio-wl: listener for {service} is full"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    log::warn!("bulkhead-vmm: virtio-wl: listener for {service} is full")
                }
                Err(_) => closed.push(*id),
            }
        }
        for id in closed {
            self.listeners.remove(&id);
        }
        if announced {
            log::debug!("bulkhead-vmm: virtio-wl: {service}: accepted {name}");
            self.accepted.insert(conn, name);
        } else {
            log::info!(
                "bulkhead-vmm: virtio-wl: {service}: no listener took {name}; connection dropped"
            );
            self.sockets.remove_hub(&name);
        }
    }
}

/// What a hub name resolved to.
pub enum Resolved {
    /// The guest's end of a new listener context, and its id (for `drop_listener`).
    Listener {
        /// The guest's end.
        stream: UnixStream,
        /// Which listener it is.
        id: ListenerId,
    },
    /// A connection.
    Conn(HubConn),
}

/// Waits until `fd` has `events` or `left` passes (errors and EINTR just return).
pub fn wait_for(fd: BorrowedFd<'_>, events: libc::c_short, left: Duration) {
    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_hub_name("listen:svc").unwrap(),
            HubName::Provide(Name::try_from("svc").unwrap())
        );
        assert_eq!(
            parse_hub_name("svc@prov").unwrap(),
            HubName::Connect(
                Name::try_from("svc").unwrap(),
                Some(Name::try_from("prov").unwrap())
            )
        );
        assert_eq!(
            parse_hub_name("svc").unwrap(),
            HubName::Connect(Name::try_from("svc").unwrap(), None)
        );
        for bad in [
            "",
            "listen:",
            "@p",
            "s@",
            "a@b@c",
            "listen:a@b",
            "x%d",
            "listen:listen:x",
        ] {
            assert!(parse_hub_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_stream_socket_is_not_a_hub_channel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let err = HubLink::new(OwnedFd::from(a), WlSockets::new())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("SOCK_SEQPACKET"), "{err}");
        let (a, _b) = Channel::pair().unwrap();
        assert!(HubLink::new(a.into_fd(), WlSockets::new()).is_ok());
    }
}
