//! Stopping the supervised children at shutdown: each live child in reverse start order
//! gets SIGTERM, then SIGKILL (its process group too) after its stop timeout, while the
//! caller's wait keeps reaping and draining output. What follows (kill(-1), unmount,
//! reboot) is [`crate::shutdown`].

use std::time::Duration;

use log::{debug, error, warn};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::services::{Clock, Services};
use crate::supervisor::{ChildId, State};

impl Services {
    /// Shutdown, first stage: each live child in reverse start order gets SIGTERM, then
    /// SIGKILL after its stop timeout. `wait` blocks for at most the given time or until
    /// a signal arrives (the caller's signalfd); output keeps being drained meanwhile.
    pub fn stop_all(&mut self, clock: &Clock, wait: &mut dyn FnMut(&mut Services, Duration)) {
        for (id, pid) in self.sup.begin_stop() {
            let Some(child) = self.sup.child(id) else {
                continue;
            };
            let name = child.name.clone();
            let timeout = child.params.stop_timeout;
            debug!("stopping {name} (pid {pid})");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            if !self.wait_stopped(id, clock, timeout, wait) {
                warn!("{name} did not stop after SIGTERM, sending SIGKILL");
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                if !self.wait_stopped(id, clock, Duration::from_secs(5), wait) {
                    error!("{name} (pid {pid}) still not reaped after SIGKILL");
                }
            }
        }
    }

    fn wait_stopped(
        &mut self,
        id: ChildId,
        clock: &Clock,
        timeout: Duration,
        wait: &mut dyn FnMut(&mut Services, Duration),
    ) -> bool {
        let deadline = clock.now().saturating_add(timeout);
        loop {
            self.reap(clock);
            let stopping = self
                .sup
                .child(id)
                .is_some_and(|c| matches!(c.state, State::Stopping { .. }));
            if !stopping {
                return true;
            }
            let now = clock.now();
            if now >= deadline {
                return false;
            }
            wait(self, deadline - now);
        }
    }
}
