//! The hub: one unprivileged process that mediates every cross-VM exchange.
//!
//! It owns one [`Channel`] per VM (identity = which channel), the service [`registry`], a
//! socket pair per connection, the policy generations ([`reload`]), the [`handles`] table,
//! the [`memfd_server`] and the [`audit`] log, and serves the policy control socket
//! ([`control`]). Everything runs in one `poll(2)` loop ([`Hub::run`]); no threads.
//!
//! Back-pressure: each side of a connection has a bounded queue of frames the hub could not
//! yet hand to that side's VMM. While it is full, the hub stops reading from the other side,
//! so that sender's socket fills and its VMM gets `EAGAIN`; no other connection or VM is
//! affected.

pub mod audit;
pub mod client;
pub mod control;
pub mod handles;
pub mod memfd_server;
pub mod protocol;
pub mod registry;
pub mod reload;
pub mod router;
pub mod seccomp;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_policy::{ConnectionCaps, Direction, RootDir, ValidateOptions};
use nix::sys::socket::MsgFlags;

use crate::channel::{
    close_fds, Channel, ChannelError, ChannelListener, RawFrame, RecvBatch, SEND_BATCH,
};
use crate::classify::{classify, FdKind, ObjKey};
use crate::frame;
use audit::{Audit, Entry};
use handles::{Handles, VmIdx};
use memfd_server::MemfdServer;
use protocol::{ConnEvent, ConnId, ConnSend, FdInfo, HubEvent, Name, Refusal, VmRequest};
use registry::Registry;
use reload::PolicyStore;
use router::{FdIn, Hop};

/// Frames queued per connection side (and per VM channel) before back-pressure.
pub const DEFAULT_QUEUE: usize = 64;
/// Most cached read-only memfd descriptions.
const RO_CACHE: usize = 256;
/// How often the memfd server looks for released allocations while the hub is busy.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most frames read from one connection side per wake-up (then the others get a turn).
const READ_BUDGET: usize = 128;
/// Default for [`HubConfig::max_conns_per_vm`].
pub const DEFAULT_MAX_CONNS_PER_VM: usize = 256;
/// Most control-socket clients at once.
pub const MAX_CONTROL_CLIENTS: usize = 16;

/// How to start a hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Policy roots (first = where `policyctl` edits go).
    pub roots: Vec<RootDir>,
    /// Audit log file (stderr when `None`).
    pub audit: Option<PathBuf>,
    /// Policy control socket to listen on.
    pub control_socket: Option<PathBuf>,
    /// Queue bound per side.
    pub queue_limit: usize,
    /// Return from `run` when every VM channel has closed.
    pub exit_when_no_vms: bool,
    /// Most connections one VM may open as a client (bounds the hub's fds per VM).
    pub max_conns_per_vm: usize,
}

/// Errors that stop the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The audit log could not be opened.
    #[error("audit log {path}: {err}")]
    Audit {
        /// The file.
        path: String,
        /// The error.
        #[source]
        err: std::io::Error,
    },
    /// The control socket could not be bound.
    #[error("control socket {path}: {err}")]
    Control {
        /// The socket.
        path: String,
        /// The error.
        #[source]
        err: ChannelError,
    },
    /// poll(2) failed.
    #[error("poll: {0}")]
    Poll(nix::errno::Errno),
}

/// A descriptor waiting to be sent: the hub's own, or shared with the read-only cache (a
/// memfd delivered without WRITE goes out as the cached read-only description itself, not a
/// dup of it: SCM_RIGHTS copies it into the receiver, and the hub keeps its one copy).
enum OutFd {
    Own(OwnedFd),
    Shared(Arc<OwnedFd>),
}

impl AsFd for OutFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            OutFd::Own(f) => f.as_fd(),
            OutFd::Shared(f) => f.as_fd(),
        }
    }
}

fn own_all(fds: Vec<OwnedFd>) -> Vec<OutFd> {
    fds.into_iter().map(OutFd::Own).collect()
}

type Queued = (Vec<u8>, Vec<OutFd>);

struct VmSlot {
    name: String,
    chan: Option<Channel>,
    out: VecDeque<Queued>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Provider,
}

struct End {
    vm: VmIdx,
    sock: Channel,
    /// Frames for this end's VMM not yet sent.
    out: VecDeque<Queued>,
    /// The VMM hung up while back-pressure kept the hub from reading the rest: leave the
    /// socket out of the poll set (POLLHUP would spin) until reading resumes.
    hung_up: bool,
    /// The hub read EOF from this end: nothing more comes; the connection closes once the
    /// frames queued toward the other end are delivered.
    eof: bool,
}

/// A connection's standing under one generation.
#[derive(Clone)]
struct ConnDecision {
    generation: u64,
    /// `None`: the generation no longer allows the connection.
    caps: Option<Arc<ConnectionCaps>>,
    /// `vfds` quotas of the client and the provider.
    vfds: [u64; 2],
}

struct Conn {
    service: String,
    client: End,
    provider: End,
    /// Identities of the connection's two VMM-side socket ends (client's, provider's): a
    /// frame carrying either is refused (`v ≠ c`, policy.md's transfer check step 1).
    vmm_ends: [ObjKey; 2],
    /// Decided under one generation (cached until the next apply).
    caps: Option<ConnDecision>,
    allowed_frames: u32,
}

impl Conn {
    fn end(&self, s: Side) -> &End {
        match s {
            Side::Client => &self.client,
            Side::Provider => &self.provider,
        }
    }
    fn end_mut(&mut self, s: Side) -> &mut End {
        match s {
            Side::Client => &mut self.client,
            Side::Provider => &mut self.provider,
        }
    }
}

fn other(s: Side) -> Side {
    match s {
        Side::Client => Side::Provider,
        Side::Provider => Side::Client,
    }
}

fn dir_from(s: Side) -> Direction {
    match s {
        Side::Client => Direction::C2s,
        Side::Provider => Direction::S2c,
    }
}

/// The hub's state.
pub struct Hub {
    vms: Vec<VmSlot>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    registry: Registry,
    store: PolicyStore,
    audit: Audit,
    memfd: MemfdServer,
    handles: Handles,
    control: Option<ChannelListener>,
    clients: Vec<Channel>,
    queue_limit: usize,
    exit_when_no_vms: bool,
    /// Read-only descriptions of memfds recently delivered without WRITE (dup'ed for each
    /// delivery); emptied at every sweep so they never hold a charge.
    ro_cache: HashMap<ObjKey, Arc<OwnedFd>>,
    last_sweep: Instant,
    max_conns_per_vm: usize,
    /// Set while a batch is read: deliveries are flushed after it.
    defer_flush: bool,
    /// Receive buffers for `recvmmsg` (one set, reused for every connection).
    rx: RecvBatch,
    /// The outcomes of one receive batch (reused, to spare an allocation per batch).
    rx_out: Vec<Result<RawFrame, ChannelError>>,
    /// Senders' memfds replaced by read-only descriptions: closed together by [`Hub::bury`]
    /// once a batch is decided, before its deliveries go out (contiguous ones with one
    /// `close_range`); never held across a poll.
    grave: Vec<OwnedFd>,
}

#[derive(Clone, Copy)]
enum Src {
    Vm(VmIdx),
    Conn(ConnId, Side),
    Listener,
    Client,
}

impl Hub {
    /// Loads the policy (a bad tree: deny-all, reported loudly), opens the audit log and the
    /// control socket, and adopts the VM channels init made.
    pub fn new(cfg: HubConfig, vms: Vec<(String, Channel)>) -> Result<Hub, HubError> {
        let (store, err) = PolicyStore::boot(cfg.roots.clone(), ValidateOptions::default());
        if let Some(e) = err {
            log::error!(
                "policy is invalid; running deny-all (generation 0) until a valid apply:\n{e}"
            );
        }
        let audit = Audit::open(cfg.audit.as_deref()).map_err(|err| HubError::Audit {
            path: cfg
                .audit
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            err,
        })?;
        let control = match &cfg.control_socket {
            Some(p) => Some(
                ChannelListener::bind(p, 0o600).map_err(|err| HubError::Control {
                    path: p.display().to_string(),
                    err,
                })?,
            ),
            None => None,
        };
        let vms = vms
            .into_iter()
            .map(|(name, chan)| {
                if let Err(e) = chan.set_nonblocking(true) {
                    log::warn!("vm {name}: cannot make the channel non-blocking: {e}");
                }
                VmSlot {
                    name,
                    chan: Some(chan),
                    out: VecDeque::new(),
                }
            })
            .collect();
        Ok(Hub {
            vms,
            conns: BTreeMap::new(),
            next_conn: 1,
            registry: Registry::default(),
            store,
            audit,
            memfd: MemfdServer::new(),
            handles: Handles::default(),
            control,
            clients: Vec::new(),
            queue_limit: cfg.queue_limit.max(1),
            exit_when_no_vms: cfg.exit_when_no_vms,
            ro_cache: HashMap::new(),
            last_sweep: Instant::now(),
            max_conns_per_vm: cfg.max_conns_per_vm,
            defer_flush: false,
            rx: RecvBatch::new(),
            rx_out: Vec::new(),
            grave: Vec::new(),
        })
    }

    /// The policy store (generations).
    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    /// Runs the poll loop. Returns when every VM channel has closed (if configured so).
    pub fn run(&mut self) -> Result<(), HubError> {
        loop {
            if self.exit_when_no_vms && self.vms.iter().all(|v| v.chan.is_none()) {
                return Ok(());
            }
            let (mut pfds, srcs) = self.poll_set();
            let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: pfds is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, 1000) };
            if n < 0 {
                let e = nix::errno::Errno::last();
                if e == nix::errno::Errno::EINTR {
                    continue;
                }
                return Err(HubError::Poll(e));
            }
            if n == 0 || self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                self.sweep_memfds();
            }
            if n == 0 {
                continue;
            }
            for (p, src) in pfds.iter().zip(srcs) {
                if p.revents == 0 {
                    continue;
                }
                self.dispatch(src, p.revents);
            }
            self.bury();
        }
    }

    /// Closes the fds the hub is done with.
    fn bury(&mut self) {
        close_fds(&mut self.grave);
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Src>) {
        let mut pfds = Vec::new();
        let mut srcs = Vec::new();
        let mut push = |fd: BorrowedFd<'_>, events: libc::c_short, src: Src| {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            });
            srcs.push(src);
        };
        for (i, vm) in self.vms.iter().enumerate() {
            if let Some(ch) = &vm.chan {
                let mut ev = libc::POLLIN;
                if !vm.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                push(ch.as_fd(), ev, Src::Vm(i));
            }
        }
        for (id, c) in &self.conns {
            for s in [Side::Client, Side::Provider] {
                let me = c.end(s);
                let mut ev = 0;
                if c.end(other(s)).out.len() < self.queue_limit && me.out.len() < self.queue_limit {
                    ev |= libc::POLLIN;
                }
                if !me.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                if me.eof || (me.hung_up && ev == 0) {
                    continue;
                }
                push(me.sock.as_fd(), ev, Src::Conn(*id, s));
            }
        }
        if let Some(l) = &self.control {
            push(l.as_fd(), libc::POLLIN, Src::Listener);
        }
        for c in &self.clients {
            push(c.as_fd(), libc::POLLIN, Src::Client);
        }
        (pfds, srcs)
    }

    fn dispatch(&mut self, src: Src, revents: libc::c_short) {
        match src {
            Src::Vm(i) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_vm(i);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_vm(i);
                }
            }
            Src::Conn(id, s) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_conn(id, s);
                    self.finish_if_drained(id);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_conn(id, s);
                }
                if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.end_mut(s).hung_up = true;
                    }
                }
            }
            Src::Listener => self.accept_control(),
            Src::Client => self.serve_control(),
        }
    }

    // ---- VM channels -------------------------------------------------------------------

    fn read_vm(&mut self, vm: VmIdx) {
        for _ in 0..64 {
            let Some(ch) = self.vms.get(vm).and_then(|v| v.chan.as_ref()) else {
                return;
            };
            match ch.try_recv::<VmRequest>() {
                Ok((req, fds)) => {
                    drop(fds); // requests carry no fds; any attached are closed
                    self.vm_request(vm, req);
                }
                Err(ChannelError::WouldBlock) => return,
                Err(ChannelError::Closed) => {
                    self.vm_gone(vm);
                    return;
                }
                Err(ChannelError::Sys { errno, .. }) => {
                    log::warn!(
                        "vm {}: channel error {errno}; dropping it",
                        self.vm_name(vm)
                    );
                    self.vm_gone(vm);
                    return;
                }
                Err(e) => {
                    // Bad frame: consumed and its fds closed by the channel; tell the VMM.
                    log::warn!("vm {}: bad request: {e}", self.vm_name(vm));
                    self.audit_simple(vm, "request", String::new(), Some(e.to_string()));
                    self.send_vm(
                        vm,
                        &HubEvent::Refused {
                            tag: 0,
                            error: Refusal::InvalidArgs,
                        },
                        Vec::new(),
                    );
                }
            }
        }
    }

    fn vm_name(&self, vm: VmIdx) -> String {
        self.vms.get(vm).map(|v| v.name.clone()).unwrap_or_default()
    }

    fn vm_gone(&mut self, vm: VmIdx) {
        log::info!("vm {} closed its channel", self.vm_name(vm));
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.chan = None;
            slot.out.clear();
        }
        self.forget_vm_state(vm);
    }

    /// A VM starts again with nothing: its services, connections and handle-table entries go
    /// (its channel, if open, stays).
    fn forget_vm_state(&mut self, vm: VmIdx) {
        self.registry.forget_vm(vm);
        self.handles.forget_vm(vm);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.client.vm == vm || c.provider.vm == vm)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close_conn(id, 0);
        }
        self.sweep_memfds();
    }

    fn send_vm(&mut self, vm: VmIdx, ev: &HubEvent, fds: Vec<OwnedFd>) {
        let bytes = match frame::encode(ev) {
            Ok(b) => b,
            Err(e) => {
                log::error!("cannot encode {ev:?}: {e}");
                return;
            }
        };
        let limit = self.queue_limit;
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        if slot.chan.is_none() {
            return;
        }
        if slot.out.len() >= limit.saturating_mul(4) {
            log::warn!("vm {}: not reading its channel; event dropped", slot.name);
            return;
        }
        slot.out.push_back((bytes, own_all(fds)));
        self.flush_vm(vm);
    }

    fn flush_vm(&mut self, vm: VmIdx) {
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(ch) = &slot.chan else {
            return;
        };
        match flush(ch, &mut slot.out) {
            Ok(()) | Err(ChannelError::Closed) => {}
            Err(e) => log::warn!("vm {}: send failed: {e}", slot.name),
        }
    }

    fn vm_request(&mut self, vm: VmIdx, req: VmRequest) {
        match req {
            VmRequest::Provide { tag, service } => self.provide(vm, tag, &service),
            VmRequest::Connect {
                tag,
                service,
                provider,
            } => self.connect(vm, tag, &service, provider.as_deref()),
            VmRequest::Close { tag, conn } => {
                let party = self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.client.vm == vm || c.provider.vm == vm);
                if party {
                    self.close_conn(conn, tag);
                } else {
                    self.audit_simple(
                        vm,
                        "close",
                        format!("conn {conn}"),
                        Some("not a connection of this VM".into()),
                    );
                    self.refuse_vm(vm, tag, Refusal::InvalidId);
                }
            }
            VmRequest::AllocShm { tag, size } => self.alloc_shm(vm, tag, size),
            VmRequest::Release { dev, ino } => {
                self.handles.release(vm, ObjKey { dev, ino });
            }
            VmRequest::Hello => {
                log::info!(
                    "vm {}: VMM (re)started; its earlier state is forgotten",
                    self.vm_name(vm)
                );
                if let Some(slot) = self.vms.get_mut(vm) {
                    slot.out.clear();
                }
                self.forget_vm_state(vm);
            }
        }
    }

    fn refuse_vm(&mut self, vm: VmIdx, tag: u32, error: Refusal) {
        self.send_vm(vm, &HubEvent::Refused { tag, error }, Vec::new());
    }

    fn audit_simple(&mut self, vm: VmIdx, verb: &'static str, obj: String, reason: Option<String>) {
        let generation = self.store.current().number;
        let allowed = reason.is_none();
        self.audit.record(Entry {
            generation,
            src: self.vm_name(vm),
            verb,
            obj,
            allowed,
            reason,
            ..Entry::default()
        });
    }

    fn provide(&mut self, vm: VmIdx, tag: u32, service: &str) {
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let d = gen.policy.check_provide(&name, service);
        let rules: Vec<String> = d.rules.iter().map(|r| r.to_string()).collect();
        let reason = match d.outcome {
            Err(den) => Some(den.reason.to_string()),
            Ok(_) => match self.registry.provide(service, vm) {
                Ok(()) => None,
                Err(other) => Some(format!(
                    "{service} is already provided by running vm {}",
                    self.vm_name(other)
                )),
            },
        };
        let allowed = reason.is_none();
        self.audit.record(Entry {
            generation: gen.number,
            rules,
            src: name,
            verb: "provide",
            obj: service.to_string(),
            allowed,
            reason,
            ..Entry::default()
        });
        if allowed {
            self.send_vm(vm, &HubEvent::Provided { tag }, Vec::new());
        } else {
            self.refuse_vm(vm, tag, Refusal::PermissionDenied);
        }
    }

    fn connect(&mut self, vm: VmIdx, tag: u32, service: &str, provider: Option<&str>) {
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let d = gen.policy.check_connect(&name, service, provider);
        let mut rules: Vec<String> = d.rules.iter().map(|r| r.to_string()).collect();
        let obj = format!("{service}@{}", provider.unwrap_or("*"));
        let result = match d.outcome {
            Err(den) => Err(format!("{:?}: {}", den.kind, den.reason)),
            Ok(_)
                if self.conns.values().filter(|c| c.client.vm == vm).count()
                    >= self.max_conns_per_vm =>
            {
                Err(format!(
                    "{name} has {} connections open (the hub's per-VM limit)",
                    self.max_conns_per_vm
                ))
            }
            Ok(caps) => match self.registry.provider_of(service) {
                Some(p) if self.vm_name(p) == caps.provider => {
                    let live = self.conns.values().filter(|c| c.service == service).count();
                    match caps.max_conns {
                        Some(max) if u64::try_from(live).unwrap_or(u64::MAX) >= u64::from(max) => {
                            Err(format!("max-conns {max} reached for {service}"))
                        }
                        _ => Ok((p, caps)),
                    }
                }
                _ => Err(format!(
                    "{service}: provider {} is not running or has not registered",
                    caps.provider
                )),
            },
        };
        let (prov, caps) = match result {
            Ok(x) => x,
            Err(reason) => {
                self.audit.record(Entry {
                    generation: gen.number,
                    rules,
                    src: name,
                    verb: "connect",
                    obj,
                    allowed: false,
                    reason: Some(reason),
                    ..Entry::default()
                });
                self.refuse_vm(vm, tag, Refusal::PermissionDenied);
                return;
            }
        };
        let pairs = Channel::pair().and_then(|a| Channel::pair().map(|b| (a, b)));
        let ((client_vmm, client_hub), (prov_vmm, prov_hub)) = match pairs {
            Ok(p) => p,
            Err(e) => {
                log::error!("connect {obj}: socketpair: {e}");
                self.refuse_vm(vm, tag, Refusal::OutOfMemory);
                return;
            }
        };
        for ch in [&client_hub, &prov_hub] {
            if let Err(e) = ch.set_nonblocking(true) {
                log::warn!("connect {obj}: {e}");
            }
        }
        let key_of = |ch: &Channel| ObjKey::of(ch.as_fd());
        let vmm_ends = match (key_of(&client_vmm), key_of(&prov_vmm)) {
            (Ok(c), Ok(p)) => [c, p],
            (Err(e), _) | (_, Err(e)) => {
                log::error!("connect {obj}: fstat of a new socket: {e}");
                self.refuse_vm(vm, tag, Refusal::OutOfMemory);
                return;
            }
        };
        let id = self.next_conn;
        self.next_conn = self.next_conn.wrapping_add(1).max(1);
        rules.sort();
        rules.dedup();
        self.audit.record(Entry {
            generation: gen.number,
            rules,
            src: name,
            verb: "connect",
            obj: format!("{service}@{}", caps.provider),
            fds: vec![format!("c2s={}", caps.c2s), format!("s2c={}", caps.s2c)],
            allowed: true,
            ..Entry::default()
        });
        self.conns.insert(
            id,
            Conn {
                service: service.to_string(),
                client: End {
                    vm,
                    sock: client_hub,
                    out: VecDeque::new(),
                    hung_up: false,
                    eof: false,
                },
                provider: End {
                    vm: prov,
                    sock: prov_hub,
                    out: VecDeque::new(),
                    hung_up: false,
                    eof: false,
                },
                vmm_ends,
                caps: None,
                allowed_frames: 0,
            },
        );
        let svc: Name = truncate_name(service);
        let sock_name: Name = truncate_name(&format!("wl-conn-{id}"));
        self.send_vm(
            prov,
            &HubEvent::Accept {
                service: svc,
                conn: id,
                name: sock_name,
            },
            vec![prov_vmm.into_fd()],
        );
        self.send_vm(
            vm,
            &HubEvent::Connected { tag, conn: id },
            vec![client_vmm.into_fd()],
        );
    }

    fn close_conn(&mut self, id: ConnId, tag: u32) {
        let Some(c) = self.conns.remove(&id) else {
            return;
        };
        if c.allowed_frames > 0 {
            let generation = self.store.current().number;
            self.audit.record(Entry {
                generation,
                src: self.vm_name(c.client.vm),
                verb: "transfer",
                obj: format!(
                    "{}@{} conn {id} (allowed frames, summary)",
                    c.service,
                    self.vm_name(c.provider.vm)
                ),
                allowed: true,
                similar: c.allowed_frames,
                ..Entry::default()
            });
        }
        let (a, b) = (c.client.vm, c.provider.vm);
        drop(c);
        self.send_vm(a, &HubEvent::Closed { tag, conn: id }, Vec::new());
        if b != a {
            self.send_vm(b, &HubEvent::Closed { tag: 0, conn: id }, Vec::new());
        }
    }

    fn alloc_shm(&mut self, vm: VmIdx, tag: u32, size: u64) {
        self.sweep_memfds();
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let quota = gen.policy.quota_for(&name);
        match self.memfd.alloc(vm, size, &quota) {
            Ok((fd, bytes, key)) => {
                let all = bulkhead_policy::Rights::READ
                    | bulkhead_policy::Rights::WRITE
                    | bulkhead_policy::Rights::MAP
                    | bulkhead_policy::Rights::TRANSFER
                    | bulkhead_policy::Rights::DUP;
                self.handles.grant(vm, key, all);
                self.send_vm(vm, &HubEvent::ShmAllocated { tag, size: bytes }, vec![fd]);
            }
            Err(e) => {
                let refusal = match e {
                    memfd_server::ShmError::Quota { .. } => Refusal::OutOfMemory,
                    memfd_server::ShmError::Sys { .. } => Refusal::OutOfMemory,
                    _ => Refusal::InvalidArgs,
                };
                let mut rules: Vec<String> =
                    [quota.shm.from.as_ref(), quota.shm_count.from.as_ref()]
                        .into_iter()
                        .flatten()
                        .map(|r| r.to_string())
                        .collect();
                rules.dedup();
                self.audit.record(Entry {
                    generation: gen.number,
                    rules,
                    src: name,
                    verb: "quota",
                    obj: format!("shm {size}"),
                    allowed: false,
                    reason: Some(e.to_string()),
                    ..Entry::default()
                });
                self.refuse_vm(vm, tag, refusal);
            }
        }
    }

    fn sweep_memfds(&mut self) {
        // The cache's own descriptions and fds waiting to be closed would count as holders:
        // drop them first.
        self.ro_cache.clear();
        self.bury();
        self.audit.flush();
        self.last_sweep = Instant::now();
        for key in self.memfd.sweep() {
            self.handles.forget_object(key);
        }
        self.handles.sweep_probes(memfd_server::still_held);
    }

    // ---- connections -------------------------------------------------------------------

    /// Reads a batch from one side; deliveries are flushed once after the batch (with
    /// `sendmmsg`), so both VMMs see bursts rather than one wake-up per frame.
    fn read_conn(&mut self, id: ConnId, s: Side) {
        self.defer_flush = true;
        self.read_conn_batch(id, s);
        self.defer_flush = false;
        self.bury(); // on every path out of the read, before the deliveries go out
        self.flush_conn(id, other(s));
        self.flush_conn(id, s);
        self.finish_if_drained(id);
    }

    /// Closes a connection one side of which sent EOF, once everything queued toward the
    /// other side is delivered (a sender's last frames are not lost).
    fn finish_if_drained(&mut self, id: ConnId) {
        let done = self.conns.get(&id).is_some_and(|c| {
            (c.client.eof && c.provider.out.is_empty())
                || (c.provider.eof && c.client.out.is_empty())
        });
        if done {
            self.close_conn(id, 0);
        }
    }

    /// Reads frames from one side with `recvmmsg` batches until the socket is empty, the
    /// queues are full (back-pressure: the rest stays in the sender's socket) or
    /// `READ_BUDGET` frames were read. Each frame is still decided on its own (`route`);
    /// after each batch the senders' fds it consumed are closed, and `read_conn` then
    /// sends everything queued with `sendmmsg`.
    fn read_conn_batch(&mut self, id: ConnId, s: Side) {
        let mut budget = READ_BUDGET;
        while budget > 0 {
            let limit = self.queue_limit;
            let Some(c) = self.conns.get(&id) else {
                return;
            };
            if c.end(s).eof {
                return;
            }
            let queued = c.end(other(s)).out.len().max(c.end(s).out.len());
            // Never read more than the queues can take: every frame read may queue one
            // delivery (or one refusal), and the bound stays exact.
            let room = limit.saturating_sub(queued).min(budget);
            if room == 0 {
                return; // back-pressure: leave it in the sender's socket
            }
            let mut got = std::mem::take(&mut self.rx_out);
            got.clear();
            let res = c.end(s).sock.try_recv_frames(&mut self.rx, room, &mut got);
            let asked = room.min(crate::channel::RECV_BATCH);
            match res {
                Ok(()) => {}
                Err(ChannelError::WouldBlock) => {
                    self.rx_out = got;
                    return;
                }
                Err(_) => {
                    // Closed, or the socket failed: nothing more comes from this side.
                    self.rx_out = got;
                    self.end_eof(id, s);
                    return;
                }
            }
            let n = got.len();
            budget = budget.saturating_sub(n.max(1));
            let mut eof = false;
            for outcome in got.drain(..) {
                match outcome {
                    Ok(raw) => self.route(id, s, raw.bytes, raw.fds),
                    Err(ChannelError::Closed) | Err(ChannelError::Sys { .. }) => {
                        eof = true;
                        break;
                    }
                    Err(e) => {
                        // Truncated / empty / oversize: consumed, fds closed. Refuse it.
                        self.deny_frame(
                            id,
                            s,
                            0,
                            Refusal::InvalidArgs,
                            e.to_string(),
                            Vec::new(),
                            Vec::new(),
                        );
                    }
                }
            }
            self.rx_out = got;
            if eof {
                self.end_eof(id, s);
                return;
            }
            // The senders' fds this batch replaced close now; the deliveries (and refusals)
            // go out once the read is over (`read_conn`): one burst of up to the queue
            // limit wakes the receiver once, where a flush per batch let it wake (and
            // preempt the hub on a busy machine) twice as often, for more CPU per frame on
            // both sides (measured, docs/ipc.md §7).
            self.bury();
            if n < asked {
                return; // the socket was empty: no need for a call that says EAGAIN
            }
        }
    }

    /// The hub read EOF (or an error) from one side: nothing more comes from it.
    fn end_eof(&mut self, id: ConnId, s: Side) {
        if let Some(c) = self.conns.get_mut(&id) {
            let me = c.end_mut(s);
            me.eof = true;
            me.out.clear(); // refusals for a sender that left
        }
    }

    fn flush_conn(&mut self, id: ConnId, s: Side) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let end = c.end_mut(s);
        if let Err(e) = flush(&end.sock, &mut end.out) {
            log::debug!("conn {id}: {e}; closing");
            self.close_conn(id, 0);
        }
    }

    /// The standing of `id` under generation `gen` (cached per generation).
    fn conn_decision(&mut self, id: ConnId, gen: &reload::Generation) -> Option<ConnDecision> {
        let c = self.conns.get(&id)?;
        if let Some(d) = &c.caps {
            if d.generation == gen.number {
                return Some(d.clone());
            }
        }
        let client = self.vm_name(c.client.vm);
        let provider = self.vm_name(c.provider.vm);
        let caps = gen
            .policy
            .check_connect(&client, &c.service, Some(&provider))
            .outcome
            .ok()
            .map(Arc::new);
        let d = ConnDecision {
            generation: gen.number,
            caps,
            vfds: [
                gen.policy.quota_for(&client).vfds.value,
                gen.policy.quota_for(&provider).vfds.value,
            ],
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.caps = Some(d.clone());
        }
        Some(d)
    }

    /// Caps of `id` under generation `gen`.
    fn conn_caps(&mut self, id: ConnId, gen: &reload::Generation) -> Option<Arc<ConnectionCaps>> {
        self.conn_decision(id, gen).and_then(|d| d.caps)
    }

    #[allow(clippy::too_many_arguments)]
    fn deny_frame(
        &mut self,
        id: ConnId,
        s: Side,
        seq: u32,
        refusal: Refusal,
        reason: String,
        rules: Vec<String>,
        fds: Vec<String>,
    ) {
        let generation = self.store.current().number;
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (src, dst) = (c.end(s).vm, c.end(other(s)).vm);
        let obj = format!(
            "{}@{} conn {id} {} → {}",
            c.service,
            self.vm_name(c.provider.vm),
            dir_from(s),
            self.vm_name(dst)
        );
        self.audit.record(Entry {
            generation,
            rules,
            src: self.vm_name(src),
            verb: "transfer",
            obj,
            fds,
            allowed: false,
            reason: Some(reason),
            similar: 0,
        });
        self.queue_conn(
            id,
            s,
            &ConnEvent::Refused {
                seq,
                error: refusal,
            },
            Vec::new(),
        );
    }

    fn queue_conn(&mut self, id: ConnId, s: Side, ev: &ConnEvent, fds: Vec<OutFd>) {
        let bytes = match frame::encode(ev) {
            Ok(b) => b,
            Err(e) => {
                log::error!("conn {id}: cannot encode an event: {e}");
                return;
            }
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.end_mut(s).out.push_back((bytes, fds));
        }
        if !self.defer_flush {
            self.flush_conn(id, s);
        }
    }

    fn route(&mut self, id: ConnId, s: Side, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        let msg: ConnSend = match frame::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                return self.deny_frame(
                    id,
                    s,
                    0,
                    Refusal::InvalidArgs,
                    format!("bad frame: {e}"),
                    Vec::new(),
                    Vec::new(),
                );
            }
        };
        if msg.rights.len() != fds.len() {
            let reason = format!(
                "{} fds attached, {} rights given",
                fds.len(),
                msg.rights.len()
            );
            return self.deny_frame(
                id,
                s,
                msg.seq,
                Refusal::InvalidArgs,
                reason,
                Vec::new(),
                Vec::new(),
            );
        }
        // One generation for the whole decision.
        let gen = self.store.current();
        let decision = self.conn_decision(id, &gen);
        let Some((caps, vfds)) = decision.and_then(|d| d.caps.map(|c| (c, d.vfds))) else {
            let reason = format!("generation {} no longer allows this connection", gen.number);
            return self.deny_frame(
                id,
                s,
                msg.seq,
                Refusal::PermissionDenied,
                reason,
                Vec::new(),
                Vec::new(),
            );
        };
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (sender, receiver) = (c.end(s).vm, c.end(other(s)).vm);
        let vmm_ends = c.vmm_ends;
        let [client_vfds, provider_vfds] = vfds;
        let (sender_vfds, receiver_vfds) = match s {
            Side::Client => (client_vfds, provider_vfds),
            Side::Provider => (provider_vfds, client_vfds),
        };
        let ins: Vec<FdIn> = fds
            .iter()
            .zip(msg.rights.iter())
            .map(|(fd, r)| FdIn {
                class: classify(fd.as_fd()),
                requested: *r,
            })
            .collect();
        let hop = Hop {
            caps: &caps,
            dir: dir_from(s),
            sender,
            receiver,
            receiver_vfds,
            sender_vfds,
            conn_ends: &vmm_ends,
        };
        match router::check_frame(&gen.policy, hop, &self.handles, &ins) {
            Err(rej) => {
                drop(fds);
                let described: Vec<String> = ins
                    .iter()
                    .map(|f| match &f.class {
                        Ok(c) => router::describe(c.kind, f.requested),
                        Err(e) => format!("unclassifiable({e}):{}", f.requested),
                    })
                    .collect();
                self.deny_frame(
                    id,
                    s,
                    msg.seq,
                    rej.refusal,
                    rej.reason,
                    rej.rules,
                    described,
                );
            }
            Ok(approved) => {
                let probes = self.track_attenuated(&approved, &fds);
                let fds = match self.attenuate_memfds(&approved, fds) {
                    Ok(fds) => fds,
                    Err(reason) => {
                        return self.deny_frame(
                            id,
                            s,
                            msg.seq,
                            Refusal::OutOfMemory,
                            reason,
                            Vec::new(),
                            Vec::new(),
                        )
                    }
                };
                router::commit(&mut self.handles, hop, &approved);
                for (key, probe) in probes {
                    self.handles.set_probe(key, probe);
                }
                let mut infos = heapless::Vec::new();
                for a in &approved {
                    let info = FdInfo {
                        fd_type: a.class.fd_type(),
                        write_end: a.class.kind == FdKind::PipeWrite,
                        rights: a.rights,
                    };
                    if infos.push(info).is_err() {
                        break; // cannot happen: at most MAX_FDS arrived
                    }
                }
                if let Some(c) = self.conns.get_mut(&id) {
                    c.allowed_frames = c.allowed_frames.saturating_add(1);
                }
                let ev = ConnEvent::Deliver {
                    data: msg.data,
                    fds: infos,
                };
                self.queue_conn(id, other(s), &ev, fds);
            }
        }
    }

    /// For a memfd delivered with attenuated rights (a tombstone may have to outlive its
    /// entries, see [`handles::Handles`]): the sender's description gets the hub's OFD lock
    /// (read-only copies get it when made), and the first time the object is seen the hub
    /// keeps a probe of it (returned, kept once the frame commits), so a sweep can tell when no description it passed is open.
    /// The memfd server's own allocations are tracked by the server. A failure only costs
    /// the probe (the tombstone then lasts until every VM that held the object is gone).
    fn track_attenuated(
        &mut self,
        approved: &[router::Approved],
        fds: &[OwnedFd],
    ) -> Vec<(ObjKey, OwnedFd)> {
        let mut probes = Vec::new();
        for (a, fd) in approved.iter().zip(fds) {
            let key = a.class.key;
            if a.class.kind != FdKind::Memfd
                || a.rights.contains(a.class.max_rights)
                || self.memfd.is_alloc(key)
            {
                continue;
            }
            if let Err(e) = memfd_server::lock_description(fd.as_fd()) {
                log::debug!("memfd {key:?}: cannot lock the sender's description: {e}");
                continue;
            }
            if !self.handles.has_probe(key) {
                match self.memfd.probe(fd.as_fd()) {
                    Ok(p) => probes.push((key, p)),
                    Err(e) => log::debug!("memfd {key:?}: no probe: {e}"),
                }
            }
        }
        probes
    }

    /// A memfd delivered without WRITE goes out as a read-only description, so the receiver's
    /// kernel-level access matches its rights. The description is made once per object and
    /// cached; each delivery shares it (no dup per frame).
    fn attenuate_memfds(
        &mut self,
        approved: &[router::Approved],
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<OutFd>, String> {
        let mut out = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            let attenuate = approved.get(i).filter(|a| {
                a.class.kind == FdKind::Memfd
                    && a.class.max_rights.contains(bulkhead_policy::Rights::WRITE)
                    && !a.rights.contains(bulkhead_policy::Rights::WRITE)
            });
            if let Some(a) = attenuate {
                let ro = match self.ro_cache.get(&a.class.key) {
                    Some(ro) => ro.clone(),
                    None => {
                        let ro = Arc::new(
                            self.memfd
                                .readonly_copy(fd.as_fd())
                                .map_err(|e| e.to_string())?,
                        );
                        if self.ro_cache.len() >= RO_CACHE {
                            self.ro_cache.clear();
                        }
                        self.ro_cache.insert(a.class.key, ro.clone());
                        ro
                    }
                };
                // The sender's description is closed (with the batch's others, see `bury`);
                // the receiver gets the read-only one.
                self.grave.push(fd);
                out.push(OutFd::Shared(ro));
            } else {
                out.push(OutFd::Own(fd));
            }
        }
        Ok(out)
    }

    // ---- control socket ----------------------------------------------------------------

    fn accept_control(&mut self) {
        let Some(l) = &self.control else {
            return;
        };
        loop {
            match l.accept() {
                Ok(ch) => {
                    let ok = ch
                        .peer_credentials()
                        .is_ok_and(|c| c.uid == 0 || c.uid == nix::unistd::geteuid().as_raw());
                    if !ok || self.clients.len() >= MAX_CONTROL_CLIENTS {
                        log::warn!("control socket: refused a client (credentials or too many)");
                        continue;
                    }
                    if ch.set_nonblocking(true).is_ok() {
                        self.clients.push(ch);
                    }
                }
                Err(ChannelError::WouldBlock) => return,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    fn serve_control(&mut self) {
        let mut keep = Vec::new();
        let clients = std::mem::take(&mut self.clients);
        for ch in clients {
            let alive = loop {
                match ch.try_recv_frame() {
                    Ok(raw) => {
                        drop(raw.fds);
                        // SO_PEERCRED was recorded at connect: only root may apply.
                        let from_root = ch.peer_credentials().is_ok_and(|c| c.uid == 0);
                        let resp = self.control_request(&raw.bytes, from_root);
                        if !send_control(&ch, &resp) {
                            break false;
                        }
                    }
                    Err(ChannelError::WouldBlock) => break true,
                    Err(ChannelError::EmptyFrame { .. }) | Err(ChannelError::Truncated { .. }) => {
                        let resp = bulkhead_policy::control::Response::Error {
                            message: "bad request".into(),
                        };
                        if !send_control(&ch, &resp) {
                            break false;
                        }
                    }
                    Err(_) => break false,
                }
            };
            if alive {
                keep.push(ch);
            }
        }
        self.clients = keep;
    }

    /// Connections the running generation no longer allows, as `LiveCap`s; with `revoke`,
    /// they are closed.
    fn no_longer_allowed(&mut self, revoke: bool) -> Vec<bulkhead_policy::control::LiveCap> {
        let gen = self.store.current();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            if self.conn_caps(id, &gen).is_none() {
                if let Some(c) = self.conns.get(&id) {
                    out.push(bulkhead_policy::control::LiveCap {
                        kind: "connection".into(),
                        vm: self.vm_name(c.client.vm),
                        description: format!(
                            "{} → {}@{} (conn {id})",
                            self.vm_name(c.client.vm),
                            c.service,
                            self.vm_name(c.provider.vm)
                        ),
                    });
                }
                if revoke {
                    self.close_conn(id, 0);
                }
            }
        }
        out
    }

    /// Answers one control request (bytes are untrusted).
    /// `from_root`: the client is uid 0 (the only one allowed to apply a policy).
    pub fn control_request(
        &mut self,
        bytes: &[u8],
        from_root: bool,
    ) -> bulkhead_policy::control::Response {
        control::handle(self, bytes, from_root)
    }
}

fn truncate_name(s: &str) -> Name {
    let mut n = Name::new();
    for ch in s.chars() {
        if n.push(ch).is_err() {
            break;
        }
    }
    n
}

/// Sends queued frames, `SEND_BATCH` per `sendmmsg`, until the queue is empty or the socket
/// is full; `Err` if the peer is gone. The hub's own fds of the frames sent are closed before
/// it returns (`close_fds`).
fn flush(ch: &Channel, q: &mut VecDeque<Queued>) -> Result<(), ChannelError> {
    let mut sent_fds = Vec::new();
    let r = flush_into(ch, q, &mut sent_fds);
    close_fds(&mut sent_fds);
    r
}

fn flush_into(
    ch: &Channel,
    q: &mut VecDeque<Queued>,
    grave: &mut Vec<OwnedFd>,
) -> Result<(), ChannelError> {
    while !q.is_empty() {
        let asked = q.len().min(SEND_BATCH);
        match ch.try_send_frames(q.iter().map(|(bytes, fds)| (bytes, fds.as_slice()))) {
            Ok(n) => {
                for (_, fds) in q.drain(..n.min(q.len())) {
                    grave.extend(fds.into_iter().filter_map(|f| match f {
                        OutFd::Own(f) => Some(f),
                        OutFd::Shared(_) => None,
                    }));
                }
                if n < asked {
                    // The socket filled up (POLLOUT resumes), or the next frame fails and
                    // the next flush reports it.
                    return Ok(());
                }
            }
            Err(ChannelError::WouldBlock) => return Ok(()),
            Err(e) => {
                q.clear();
                return Err(e);
            }
        }
    }
    Ok(())
}

fn send_control(ch: &Channel, resp: &bulkhead_policy::control::Response) -> bool {
    match bulkhead_policy::control::encode_response(resp) {
        Ok(bytes) => nix::sys::socket::send(
            ch.as_raw_fd(),
            &bytes,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .is_ok(),
        Err(e) => {
            log::error!("control: cannot encode a response: {e}");
            false
        }
    }
}
