//! The hub: one unprivileged process that mediates every cross-VM exchange.
//!
//! It owns one [`Channel`] per VM (identity = which channel), the service [`registry`], a
//! socket pair per connection, the policy generations ([`reload`]), the [`handles`] table,
//! the [`memfd_server`] and the [`audit`] log, and serves the policy control socket
//! ([`control`]). Everything runs in one `poll(2)` loop ([`Hub::run`], `event_loop.rs`); no
//! threads. One file per mechanism: `vm.rs` (VM channels and their requests), `conn.rs`
//! (connections), `end.rs` (one VMM's end: reading it, its queue, verdicts), `route.rs` (one
//! send: a pure `decide`, then `commit`), `mediate.rs` and `target.rs` (sockets in sends),
//! `budget.rs` (per-VM budgets), `attenuate.rs` (read-only descriptions, locks and probes),
//! `queue.rs` (outbound queues, packed), `control.rs` (the policy control socket).
//!
//! Back-pressure: each VM has budgets (`budget.rs`); a send toward a VM past them, or whose
//! queue is full, is refused `Busy` (and `Ready` follows when there is room), and a VM that
//! does not read is sent nothing more; no other connection or VM is affected.

pub mod audit;
pub mod client;
pub mod control;
pub mod handles;
pub mod memfd_server;
pub mod protocol;
pub mod registry;
pub mod reload;
pub mod router;

pub mod budget;

mod attenuate;
mod conn;
mod end;
mod event_loop;
mod mediate;
mod queue;
mod route;
mod target;
mod vm;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_policy::{RootDir, ValidateOptions};

use crate::channel::{
    peer_credentials, Channel, ChannelError, ChannelListener, PeerCredentials, RawFrame, RecvBatch,
};
use crate::classify::ObjKey;
use audit::Audit;
use budget::Budgets;
use conn::Conn;
use handles::{FastMap, Handles};
use mediate::Mediated;
use memfd_server::MemfdServer;
use protocol::ConnId;
use registry::Registry;
use reload::PolicyStore;
use vm::VmSlot;

/// Events queued per connection side before sends toward it are `Busy` (and 4 × this per
/// VM channel).
pub const DEFAULT_QUEUE: usize = 64;
/// How often the memfd server looks for released allocations while the hub is busy.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most frames read from one connection side per wake-up (then the others get a turn).
pub(super) const READ_BUDGET: usize = 128;
/// Default for [`Budgets::conns`].
pub const DEFAULT_MAX_CONNS_PER_VM: usize = 256;
/// The poll timeout while sends wait for fds in flight to be received (the kernel does not
/// wake the hub for that).
const STALL_RETRY: Duration = Duration::from_millis(5);
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
    /// Return from `run` when every VM channel has closed.
    pub exit_when_no_vms: bool,
    /// Per-VM budgets (the fd budgets are fitted to `RLIMIT_NOFILE` at start).
    pub budgets: Budgets,
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
    budgets: Budgets,
    exit_when_no_vms: bool,
    /// Mediated sockets (`mediate.rs`), numbered with the connections.
    meds: BTreeMap<ConnId, Mediated>,
    /// The VMM-side ends of every connection and mediated socket: never passed.
    hub_ends: FastMap<ObjKey, ConnId>,
    /// `SO_PEERCRED` of the VM channels (whoever made them, init): a seqpacket socket they
    /// made is never mediated (it may be a VM channel).
    chan_makers: Vec<PeerCredentials>,
    /// A send waits for fds in flight to be received, or for a kernel resource: poll with
    /// a short timeout.
    stalled: bool,
    /// Ends owed a `Ready` (`conn::Hub::grant_ready`).
    owed_ready: usize,
    /// Read-only descriptions of memfds recently delivered without WRITE (dup'ed for each
    /// delivery); emptied at every sweep so they never hold a charge.
    ro_cache: HashMap<ObjKey, Arc<OwnedFd>>,
    last_sweep: Instant,
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
        let mut chan_makers = Vec::new();
        let vms: Vec<VmSlot> = vms
            .into_iter()
            .map(|(name, chan)| {
                if let Err(e) = chan.set_nonblocking(true) {
                    log::warn!("vm {name}: cannot make the channel non-blocking: {e}");
                }
                if let Ok(c) = peer_credentials(chan.as_fd()) {
                    if !chan_makers.contains(&c) {
                        chan_makers.push(c);
                    }
                }
                VmSlot::new(name, chan)
            })
            .collect();
        let mut budgets = cfg.budgets;
        fit_budgets(&mut budgets, vms.len());
        Ok(Hub {
            vms,
            conns: BTreeMap::new(),
            next_conn: 1,
            registry: Registry::default(),
            store,
            audit,
            memfd: MemfdServer::new(),
            handles: Handles::new(budgets.tombstones),
            control,
            clients: Vec::new(),
            budgets,
            exit_when_no_vms: cfg.exit_when_no_vms,
            meds: BTreeMap::new(),
            hub_ends: FastMap::default(),
            chan_makers,
            stalled: false,
            owed_ready: 0,
            ro_cache: HashMap::new(),
            last_sweep: Instant::now(),
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

    /// The budgets in force (after fitting them to `RLIMIT_NOFILE`).
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one, and shrinks the fd budgets to fit it
/// if they must (said loudly: init should give the hub more, docs/ipc.md §4).
fn fit_budgets(b: &mut Budgets, vms: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(e) => {
            log::warn!("getrlimit(RLIMIT_NOFILE): {e}");
            return;
        }
    };
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let want = b.fds_needed(vms);
    if b.fit(nofile, vms) {
        log::warn!(
            "RLIMIT_NOFILE is {nofile}, the default budgets for {vms} VMs need {want}: per VM now {} fds held, {} in flight, {} connections",
            b.fds,
            b.inflight,
            b.conns
        );
    }
}
