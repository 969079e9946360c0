//! Stopping children: one at a time on request (an operator's `stop` or `restart`, the hub's
//! failure) without ever waiting in the event loop, and all of them at shutdown in parallel.
//!
//! Every child leads its own process group (a plain service gets `setpgid`, a jailed one
//! `setsid`), and every signal of a stop goes to that group with `killpg`: SIGTERM (a VMM
//! presses its guest's ACPI power button), then, past the stop timeout, SIGKILL. The same
//! target at every step, so what a service started itself goes down with it.
//!
//! At shutdown every service gets SIGTERM at the same moment and its SIGKILL at its own
//! stop timeout counted from that moment (capped by `[host] shutdown_timeout_ms`, the one
//! overall deadline), so stopping N VMs takes one stop timeout, not N. The support
//! processes (the hub) go last, in reverse start order. What follows (kill(-1), unmount,
//! reboot) is [`crate::shutdown`].

use std::time::Duration;

use log::{debug, error, info, warn};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::services::{Clock, Services};
use crate::supervisor::{AfterStop, ChildId, State};

/// How long init waits for a child it sent SIGKILL to before it says so.
const AFTER_SIGKILL: Duration = Duration::from_secs(5);

/// A stop in progress: when its SIGKILL is due, and whether it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopTimer {
    /// SIGKILL at this time (after SIGKILL: when init gives up waiting).
    pub due: Duration,
    /// SIGKILL was sent.
    pub killed: bool,
}

/// Sends `sig` to the process group `pid` leads. Never to pid 0 or 1 (that would be
/// init's own group or init).
pub fn signal_group(pid: i32, sig: Signal) {
    if pid <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pid), sig) {
        debug!("killpg({pid}, {sig}): {e}");
    }
}

impl Services {
    /// Asks child `id` to stop (SIGTERM to its group now, SIGKILL after its stop timeout);
    /// `then` says what follows. Returns the pid signalled, if it was running.
    pub fn stop_child(&mut self, id: ChildId, then: AfterStop, now: Duration) -> Option<i32> {
        let timeout = self.sup.child(id)?.params.stop_timeout;
        let pid = self.sup.request_stop(id, then, now)?;
        self.send_term(id, pid, now.saturating_add(timeout));
        Some(pid)
    }

    fn send_term(&mut self, id: ChildId, pid: i32, kill_at: Duration) {
        let name = self.name_of(id);
        debug!("stopping {name} (pid {pid}): SIGTERM to its process group");
        signal_group(pid, Signal::SIGTERM);
        let timer = self.stop_timers.entry(id.0).or_insert(StopTimer {
            due: kill_at,
            killed: false,
        });
        if !timer.killed {
            timer.due = timer.due.min(kill_at);
        }
    }

    /// Sends SIGKILL to the stopping children whose stop timeout has passed, and forgets
    /// the timers of children that are gone. Called on every turn of the loop.
    pub fn enforce_stop_timers(&mut self, now: Duration) {
        let ids: Vec<usize> = self.stop_timers.keys().copied().collect();
        for i in ids {
            let id = ChildId(i);
            let pid = match self.sup.child(id).map(|c| &c.state) {
                Some(State::Stopping { pid, .. }) => *pid,
                _ => {
                    self.stop_timers.remove(&i);
                    continue;
                }
            };
            let Some(timer) = self.stop_timers.get(&i).copied() else {
                continue;
            };
            if now < timer.due {
                continue;
            }
            let name = self.name_of(id);
            if timer.killed {
                error!("{name} (pid {pid}) still not reaped after SIGKILL");
                self.stop_timers.remove(&i);
                continue;
            }
            warn!("{name} did not stop after SIGTERM, sending SIGKILL");
            signal_group(pid, Signal::SIGKILL);
            self.stop_timers.insert(
                i,
                StopTimer {
                    due: now.saturating_add(AFTER_SIGKILL),
                    killed: true,
                },
            );
        }
    }

    /// The earliest pending SIGKILL.
    pub(crate) fn next_stop_deadline(&self) -> Option<Duration> {
        self.stop_timers.values().map(|t| t.due).min()
    }

    fn name_of(&self, id: ChildId) -> String {
        self.sup
            .child(id)
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }

    fn stopping(&self, ids: &[ChildId]) -> bool {
        ids.iter().any(|id| {
            self.sup
                .child(*id)
                .is_some_and(|c| matches!(c.state, State::Stopping { .. }))
        })
    }

    /// Shutdown, first stage: every service at once (SIGTERM now, SIGKILL at its stop
    /// timeout, at most `overall` from now), then the support processes (the hub) one by one
    /// in reverse start order. `wait` blocks for at most the given time or until a signal
    /// arrives (the caller's signalfd); output keeps being drained meanwhile.
    pub fn stop_all(
        &mut self,
        clock: &Clock,
        overall: Option<Duration>,
        wait: &mut dyn FnMut(&mut Services, Duration),
    ) {
        let live = self.sup.begin_stop();
        let services: Vec<(ChildId, i32)> = live
            .iter()
            .filter(|(_, _, support)| !support)
            .map(|(id, pid, _)| (*id, *pid))
            .collect();
        let support: Vec<(ChildId, i32)> = live
            .iter()
            .filter(|(_, _, support)| *support)
            .map(|(id, pid, _)| (*id, *pid))
            .collect();
        let start = clock.now();
        for (id, pid) in &services {
            let own = self
                .sup
                .child(*id)
                .map(|c| c.params.stop_timeout)
                .unwrap_or_default();
            let timeout = overall.map_or(own, |o| own.min(o));
            self.send_term(*id, *pid, start.saturating_add(timeout));
        }
        let ids: Vec<ChildId> = services.iter().map(|(id, _)| *id).collect();
        self.wait_stopped(&ids, clock, wait);
        if !services.is_empty() {
            info!(
                "stopped {} services in {} ms",
                services.len(),
                clock.now().saturating_sub(start).as_millis()
            );
        }
        for (id, pid) in support {
            let timeout = self
                .sup
                .child(id)
                .map(|c| c.params.stop_timeout)
                .unwrap_or_default();
            self.send_term(id, pid, clock.now().saturating_add(timeout));
            self.wait_stopped(&[id], clock, wait);
        }
    }

    /// Reaps and enforces the stop timers until none of `ids` is stopping (each is reaped,
    /// or given up on after SIGKILL).
    fn wait_stopped(
        &mut self,
        ids: &[ChildId],
        clock: &Clock,
        wait: &mut dyn FnMut(&mut Services, Duration),
    ) {
        loop {
            self.reap(clock);
            let now = clock.now();
            self.enforce_stop_timers(now);
            let pending: Vec<ChildId> = ids
                .iter()
                .copied()
                .filter(|id| self.stop_timers.contains_key(&id.0))
                .collect();
            if !self.stopping(&pending) {
                return;
            }
            let next = self
                .next_stop_deadline()
                .unwrap_or(now)
                .saturating_sub(now)
                .max(Duration::from_millis(1));
            wait(self, next);
        }
    }
}
