//! What the control socket's requests do to the supervised children: `ls` (the list),
//! `log`, and an operator's `start`, `stop`, `restart` and `reset-failed`. None of it waits:
//! a stop sends SIGTERM and arms the SIGKILL timer ([`crate::stop`]); the event loop does
//! the rest.

use std::time::Duration;

use log::info;

use crate::control::protocol::{clip, page_of, MAX_TEXT, PAGE_BUDGET};
use crate::control::{Entry, Handler, Kind, ListPage, LogFrom, LogPage, Op, ServiceStatus};
use crate::handoff::Role;
use crate::services::Services;
use crate::supervisor::{AfterStop, ChildId, StartOutcome, State};

/// The services as the control socket sees them at one moment.
pub struct Operator<'a> {
    /// The children.
    pub services: &'a mut Services,
    /// Now, on the services' clock.
    pub now: Duration,
}

/// The state's name in `ls`: `starting` and `backing-off` are both "waiting to start",
/// told apart by whether the start is due.
pub fn state_name(state: &State, now: Duration) -> &'static str {
    match state {
        State::Waiting { at } if *at > now => "backing-off",
        State::Waiting { .. } => "starting",
        other => other.name(),
    }
}

impl Services {
    /// One entry of `ls` for child `i`.
    fn entry(&self, i: usize, now: Duration) -> Option<Entry> {
        let (_, c) = self.sup.children().nth(i)?;
        let r = self.recipes.get(i)?;
        let (kind, vm) = match &r.role {
            Role::Hub { .. } => (Kind::Hub, None),
            Role::Vm { name, .. } => (Kind::Vm, Some(name.clone())),
            Role::Plain => (Kind::Service, None),
        };
        let uptime_ms = match c.state {
            State::Running { since, .. } => {
                Some(u64::try_from(now.saturating_sub(since).as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        let next_start_ms = match c.state {
            State::Waiting { at } if at > now => {
                Some(u64::try_from(at.saturating_sub(now).as_millis()).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        let cgroup = match (&r.jail, &self.jail_paths.cgroup_root) {
            (Some(j), Some(_)) => Some(format!("{}/{}", crate::jail::CGROUP_PARENT, j.name)),
            _ => None,
        };
        Some(Entry {
            name: c.name.clone(),
            kind,
            vm,
            state: state_name(&c.state, now).to_string(),
            pid: c.state.pid().filter(|p| *p > 0),
            uid: r.user.map(|(u, _)| u),
            uptime_ms,
            starts: c.starts,
            last_exit: c.last_exit.as_ref().map(|e| clip(&e.to_string(), MAX_TEXT)),
            cgroup,
            next_start_ms,
            needs_hub: matches!(
                &r.role,
                Role::Vm {
                    channel: Some(_),
                    ..
                }
            ),
        })
    }

    /// A page of `ls`.
    pub fn list_page(&self, from: u32, now: Duration, shutting_down: bool) -> ListPage {
        let n = self.recipes.len();
        let (entries, next) = page_of((0..n).filter_map(|i| self.entry(i, now)), from);
        ListPage {
            entries,
            next,
            config_error: self.config_error.as_deref().map(|e| clip(e, MAX_TEXT)),
            shutting_down,
            hub_socket: self.hub_socket.as_deref().map(|s| clip(s, 1024)),
            boot_ms: crate::ring::boot_ms(),
        }
    }

    /// A page of one service's log.
    pub fn log_page(&self, name: &str, from: LogFrom) -> Result<LogPage, String> {
        let id = self
            .sup
            .find(name)
            .ok_or_else(|| format!("no service {:?}", clip(name, 64)))?;
        let ring = self
            .rings
            .get(id.0)
            .ok_or_else(|| format!("no log for {name}"))?;
        Ok(ring.read(from, PAGE_BUDGET))
    }

    /// Short status of every child (the old `Status` answer).
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.sup
            .children()
            .map(|(_, c)| ServiceStatus {
                name: c.name.clone(),
                state: c.state.name().to_string(),
                pid: c.state.pid(),
                starts: c.starts,
                last_exit: c.last_exit.as_ref().map(|e| clip(&e.to_string(), MAX_TEXT)),
            })
            .collect()
    }

    /// An operator's request about one child.
    pub fn operate(&mut self, op: Op, name: &str, now: Duration) -> Result<String, String> {
        let id = self
            .sup
            .find(name)
            .ok_or_else(|| format!("no service {:?}", clip(name, 64)))?;
        let verb = match op {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::ResetFailed => "reset-failed",
        };
        info!("control socket: {verb} {name} requested");
        self.note(id, &format!("{verb} requested (bulkhead-ctl)"));
        let state = self
            .sup
            .child(id)
            .map(|c| c.state.clone())
            .unwrap_or(State::Done);
        let done = match op {
            Op::Start => match self.sup.request_start(id, now)? {
                StartOutcome::Due => format!("{name}: starting"),
                StartOutcome::AlreadyRunning => format!("{name}: already running"),
                StartOutcome::AfterStop => format!("{name}: stopping; it starts again after"),
            },
            Op::Stop => match state {
                State::Running { .. } => {
                    self.stop_child(id, AfterStop::Stop, now);
                    format!("{name}: stopping (SIGTERM, then SIGKILL after its stop timeout)")
                }
                State::Stopping { .. } => {
                    self.sup.request_stop(id, AfterStop::Stop, now);
                    format!("{name}: already stopping")
                }
                State::Waiting { .. } | State::Held => {
                    self.sup.request_stop(id, AfterStop::Stop, now);
                    format!("{name}: stopped (it was not running)")
                }
                State::Done | State::Failed | State::Stopped => {
                    format!("{name}: not running ({})", state.name())
                }
            },
            Op::Restart => match state {
                State::Running { .. } | State::Stopping { .. } => {
                    self.stop_child(id, AfterStop::Restart, now);
                    self.sup.request_stop(id, AfterStop::Restart, now);
                    format!("{name}: restarting (stop, then start)")
                }
                _ => match self.sup.request_start(id, now)? {
                    StartOutcome::AlreadyRunning => format!("{name}: already running"),
                    _ => format!("{name}: starting (it was not running)"),
                },
            },
            Op::ResetFailed => {
                if self.sup.reset_failed(id, now) {
                    format!("{name}: start history forgotten; starting")
                } else {
                    format!("{name}: start history forgotten (it was not failed)")
                }
            }
        };
        Ok(done)
    }

    /// True if child `id` is the hub.
    pub fn is_hub(&self, id: ChildId) -> bool {
        self.hub == Some(id)
    }
}

impl Handler for Operator<'_> {
    fn status(&self) -> Vec<ServiceStatus> {
        self.services.status()
    }

    fn list(&self, from: u32) -> ListPage {
        self.services.list_page(from, self.now, false)
    }

    fn log(&self, name: &str, from: LogFrom) -> Result<LogPage, String> {
        self.services.log_page(name, from)
    }

    fn operate(&mut self, op: Op, name: &str) -> Result<String, String> {
        self.services.operate(op, name, self.now)
    }
}

/// The same, while the machine shuts down (nothing changes; `ls` says so).
pub struct ShuttingDown<'a> {
    /// The children.
    pub services: &'a Services,
    /// Now, on the services' clock.
    pub now: Duration,
}

impl Handler for ShuttingDown<'_> {
    fn status(&self) -> Vec<ServiceStatus> {
        self.services.status()
    }

    fn list(&self, from: u32) -> ListPage {
        self.services.list_page(from, self.now, true)
    }

    fn log(&self, name: &str, from: LogFrom) -> Result<LogPage, String> {
        self.services.log_page(name, from)
    }

    fn operate(&mut self, _op: Op, _name: &str) -> Result<String, String> {
        Err("shutting down".into())
    }
}
