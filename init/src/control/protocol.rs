//! The messages of init's control socket and the decision for each request. Each datagram
//! is one `bulkhead-ipc` frame (version byte + postcard); the enums below only ever grow
//! at their end, so a variant's index (its postcard tag) never changes:
//!
//! | tag | `Request` | answered with |
//! |---|---|---|
//! | 0 | `Status` (the old `bulkhead-init status`) | `Status` |
//! | 1 | `Poweroff` | `Ok` |
//! | 2 | `Reboot` | `Ok` |
//! | 3 | `List { from }` | `List(ListPage)` (paged: `next`) |
//! | 4 | `Start(name)` | `Done(what happened)` |
//! | 5 | `Stop(name)` | `Done` |
//! | 6 | `Restart(name)` | `Done` |
//! | 7 | `ResetFailed(name)` | `Done` |
//! | 8 | `Log { name, from }` | `Log(LogPage)` (paged: `more`) |
//!
//! `Response` tags: 0 `Status`, 1 `Ok`, 2 `Error(String)`, 3 `List`, 4 `Done(String)`,
//! 5 `Log`. Every refusal and failure is `Error` with a sentence.
//!
//! Who may ask what: on the root-only socket, everything; on the read-only socket
//! (`[control] read_group`), `Status`, `List` and `Log` only. While the machine shuts
//! down, only those three are answered.

use serde::{Deserialize, Serialize};

pub use crate::ring::{LogFrom, LogLine, LogPage};

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The supervised services (short form; `List` says more).
    Status,
    /// Orderly power-off.
    Poweroff,
    /// Orderly reboot.
    Reboot,
    /// Every service and VM, from index `from` on.
    List {
        /// First entry wanted (0, then the answer's `next`).
        from: u32,
    },
    /// Start a service that is not running (skips a pending backoff).
    Start(String),
    /// Stop a service: SIGTERM to its process group (a VMM presses its guest's power
    /// button), SIGKILL after its stop timeout; it stays stopped.
    Stop(String),
    /// Stop, then start again.
    Restart(String),
    /// Forget a service's start history; a failed one starts again.
    ResetFailed(String),
    /// A service's log.
    Log {
        /// The service.
        name: String,
        /// Where to start.
        from: LogFrom,
    },
}

impl Request {
    /// Requests that change nothing (served on the read-only socket and during shutdown).
    pub fn is_read_only(&self) -> bool {
        matches!(
            self,
            Request::Status | Request::List { .. } | Request::Log { .. }
        )
    }
}

/// One service in a `Status` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// `waiting`, `running`, `stopping`, `held`, `done`, `failed` or `stopped`.
    pub state: String,
    /// Live process id.
    pub pid: Option<i32>,
    /// Starts so far.
    pub starts: u32,
    /// How the last run ended, in words.
    pub last_exit: Option<String>,
}

/// What kind of child an entry is (`service`, `vm`, `hub` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A plain service.
    Service,
    /// The VMM of a VM.
    Vm,
    /// The hub.
    Hub,
}

/// One service or VM in a `List` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its name in system.toml.
    pub name: String,
    /// Service, VM or hub.
    pub kind: Kind,
    /// The VM's name in the policy (`vm =`).
    pub vm: Option<String>,
    /// `starting`, `running`, `backing-off`, `stopping`, `stopped`, `held`, `done`
    /// (ended under its restart policy) or `failed` (start limit).
    pub state: String,
    /// Its process (the process group it leads).
    pub pid: Option<i32>,
    /// The uid it runs as (`None`: root).
    pub uid: Option<u32>,
    /// How long the current run has lasted.
    pub uptime_ms: Option<u64>,
    /// Starts so far (restarts = starts − 1).
    pub starts: u32,
    /// How the last run ended (`exited with status 1`, `killed by signal SIGKILL`, …).
    pub last_exit: Option<String>,
    /// Its cgroup below the cgroup2 root (`bulkhead/<vm>`), when it is jailed: the client
    /// reads `memory.current` there.
    pub cgroup: Option<String>,
    /// When backing off: the next start in this many milliseconds.
    pub next_start_ms: Option<u64>,
    /// Restarts itself when the hub comes back (a VM with a hub channel).
    pub needs_hub: bool,
}

/// A page of the `List` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListPage {
    /// The entries, in start order (the hub first).
    pub entries: Vec<Entry>,
    /// Ask again with `from = next` for the rest.
    pub next: Option<u32>,
    /// Why system.toml was rejected, when it was: init then runs no service.
    pub config_error: Option<String>,
    /// The machine is shutting down.
    pub shutting_down: bool,
    /// The hub's control socket (its `--control-socket`), where its connections are told.
    pub hub_socket: Option<String>,
    /// Milliseconds since boot, now.
    pub boot_ms: u64,
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
    /// Answer to `List`.
    List(ListPage),
    /// Answer to `Start`, `Stop`, `Restart`, `ResetFailed`: what init did.
    Done(String),
    /// Answer to `Log`.
    Log(LogPage),
}

/// An operator's request about one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `start`.
    Start,
    /// `stop`.
    Stop,
    /// `restart`.
    Restart,
    /// `reset-failed`.
    ResetFailed,
}

/// What the event loop must do after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Power off.
    Poweroff,
    /// Reboot.
    Reboot,
}

/// Which socket a client came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The root-only socket: everything.
    Full,
    /// The read-only socket: `Status`, `List`, `Log`.
    ReadOnly,
}

/// What answers the requests: the supervised services.
pub trait Handler {
    /// The short status of every service.
    fn status(&self) -> Vec<ServiceStatus>;
    /// A page of the list from `from`.
    fn list(&self, from: u32) -> ListPage;
    /// A page of a service's log.
    fn log(&self, name: &str, from: LogFrom) -> Result<LogPage, String>;
    /// Carries out an operator's request; `Ok` says what happened.
    fn operate(&mut self, op: Op, name: &str) -> Result<String, String>;
}

/// Decides the answer to one request (and whether the machine goes down).
/// `accepting`: false while shutting down.
pub fn answer(
    req: Request,
    access: Access,
    accepting: bool,
    handler: &mut dyn Handler,
) -> (Response, Option<Command>) {
    if !req.is_read_only() {
        if access == Access::ReadOnly {
            return (
                Response::Error(
                    "permission denied: this socket is read-only (ls, log); only root may \
                     change anything"
                        .into(),
                ),
                None,
            );
        }
        if !accepting {
            return (Response::Error("shutting down".into()), None);
        }
    }
    let op = |h: &mut dyn Handler, op: Op, name: &str| match h.operate(op, name) {
        Ok(done) => Response::Done(done),
        Err(e) => Response::Error(e),
    };
    match req {
        Request::Status => (
            Response::Status {
                services: handler.status(),
            },
            None,
        ),
        Request::Poweroff => (Response::Ok, Some(Command::Poweroff)),
        Request::Reboot => (Response::Ok, Some(Command::Reboot)),
        Request::List { from } => (Response::List(handler.list(from)), None),
        Request::Start(name) => (op(handler, Op::Start, &name), None),
        Request::Stop(name) => (op(handler, Op::Stop, &name), None),
        Request::Restart(name) => (op(handler, Op::Restart, &name), None),
        Request::ResetFailed(name) => (op(handler, Op::ResetFailed, &name), None),
        Request::Log { name, from } => match handler.log(&name, from) {
            Ok(page) => (Response::Log(page), None),
            Err(e) => (Response::Error(e), None),
        },
    }
}

/// Bytes of entries or log text one answer carries at most (a frame is 64 KiB).
pub const PAGE_BUDGET: usize = 40 * 1024;

/// Longest string field init puts in an answer (a last exit, a config error).
pub const MAX_TEXT: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = s.get(..cut).unwrap_or_default().to_string();
    out.push('…');
    out
}

/// Builds a page of entries from `from`: as many as fit in [`PAGE_BUDGET`] (at least
/// one), with `next` set when some are left.
pub fn page_of(entries: impl Iterator<Item = Entry>, from: u32) -> (Vec<Entry>, Option<u32>) {
    let mut out = Vec::new();
    let mut used = 0usize;
    let mut index = from;
    for e in entries.skip(from as usize) {
        let cost = bulkhead_ipc::frame::encode(&e).map_or(PAGE_BUDGET, |b| b.len());
        if !out.is_empty() && used + cost > PAGE_BUDGET {
            return (out, Some(index));
        }
        used += cost;
        index = index.saturating_add(1);
        out.push(e);
    }
    (out, None)
}
