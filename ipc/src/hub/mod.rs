//! The hub: one unprivileged process that mediates every cross-VM exchange.
//!
//! It owns one [`Channel`] per VM (identity = which channel), the service [`registry`], a
//! socket pair per connection, the policy generations ([`reload`]), the [`handles`] table,
//! the [`memfd_server`] and the [`audit`] log, and serves the policy control socket
//! ([`control`]). Everything runs in one `poll(2)` loop ([`Hub::run`], `event_loop.rs`); no
//! threads. One file per mechanism: `vm.rs` (VM channels and their requests), `conn.rs`
//! (connections, reading them, their queues), `route.rs` (one frame: a pure `decide`, then
//! `commit`), `attenuate.rs` (read-only descriptions, locks and probes), `queue.rs` (outbound
//! frames), `control.rs` (the policy control socket).
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

mod attenuate;
mod conn;
mod event_loop;
mod queue;
mod route;
mod vm;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_policy::{RootDir, ValidateOptions};

use crate::channel::{Channel, ChannelError, ChannelListener, RawFrame, RecvBatch};
use crate::classify::ObjKey;
use audit::Audit;
use conn::Conn;
use handles::Handles;
use memfd_server::MemfdServer;
use protocol::ConnId;
use registry::Registry;
use reload::PolicyStore;
use vm::VmSlot;

/// Frames queued per connection side (and per VM channel) before back-pressure.
pub const DEFAULT_QUEUE: usize = 64;
/// How often the memfd server looks for released allocations while the hub is busy.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Most frames read from one connection side per wake-up (then the others get a turn).
pub(super) const READ_BUDGET: usize = 128;
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
}
