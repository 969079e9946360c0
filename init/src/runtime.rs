//! The event loop: one poll(2) over the signalfd, the control socket and its connections,
//! the power buttons and the services' output pipes, with the next restart as timeout.
//! Single-threaded by design (see pid1.md §1.9). It returns when a shutdown is requested.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use log::{debug, error, info, warn};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

use crate::config::WhenIdle;
use crate::control::{Command, ControlServer};
use crate::input::PowerButton;
use crate::services::{Clock, Services};
use crate::setup::Setup;
use crate::shutdown::PowerAction;
use crate::signals::{self, SignalAction};

/// Everything the loop watches.
pub struct Runtime {
    /// Monotonic clock.
    pub clock: Clock,
    /// The supervised children.
    pub services: Services,
    /// All signals, blocked and read here.
    pub sfd: SignalFd,
    /// The control socket, if it could be created.
    pub control: Option<ControlServer>,
    /// Power buttons found at boot.
    pub buttons: Vec<PowerButton>,
    /// What to do once every service has ended.
    pub when_idle: WhenIdle,
}

fn timeout_until(now: Duration, deadline: Option<Duration>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(at) => {
            let wait = at.saturating_sub(now);
            // Round up so a wakeup never comes a hair before the deadline.
            let ms = wait.as_micros().div_ceil(1000);
            PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Readiness of one poll set, split back by source.
struct Ready {
    signals: bool,
    control: Vec<bool>,
    buttons: Vec<bool>,
    pipes: Vec<bool>,
}

/// One poll(2) over groups of descriptors (POLLIN); for each group, which are ready. Any
/// event (POLLIN, POLLHUP, POLLERR, or bits nix does not name) means "go and look". EINTR
/// or an error reports nothing ready.
pub fn poll_groups(groups: &[&[BorrowedFd<'_>]], timeout: PollTimeout) -> Vec<Vec<bool>> {
    let events = PollFlags::POLLIN;
    let mut fds: Vec<PollFd<'_>> = groups
        .iter()
        .flat_map(|g| g.iter().map(|fd| PollFd::new(*fd, events)))
        .collect();
    let polled = match poll(&mut fds, timeout) {
        Ok(_) => true,
        Err(nix::errno::Errno::EINTR) => false,
        Err(e) => {
            warn!("poll: {e}");
            false
        }
    };
    let mut ready = fds
        .iter()
        .map(|fd| polled && fd.revents().is_none_or(|r| !r.is_empty()));
    groups
        .iter()
        .map(|g| (&mut ready).take(g.len()).collect())
        .collect()
}

fn poll_all(
    sfd: BorrowedFd<'_>,
    control: &[BorrowedFd<'_>],
    buttons: &[BorrowedFd<'_>],
    pipes: &[BorrowedFd<'_>],
    timeout: PollTimeout,
) -> Ready {
    let mut groups = poll_groups(&[&[sfd], control, buttons, pipes], timeout).into_iter();
    let mut next = || groups.next().unwrap_or_default();
    let signals = next().first().copied().unwrap_or(false);
    Ready {
        signals,
        control: next(),
        buttons: next(),
        pipes: next(),
    }
}

impl Runtime {
    /// Runs until a shutdown is requested; returns which one.
    pub fn run(&mut self) -> PowerAction {
        loop {
            if let Some(action) = self.step() {
                return action;
            }
        }
    }

    /// One turn of the loop: start what is due, wait for something (or the next
    /// deadline), handle it. Returns a requested shutdown.
    pub fn step(&mut self) -> Option<PowerAction> {
        self.services.start_due(&self.clock);
        if self.services.newly_idle() {
            info!("all services ended");
            match self.when_idle {
                WhenIdle::Stay => {}
                WhenIdle::Poweroff => return Some(PowerAction::Poweroff),
                WhenIdle::Reboot => return Some(PowerAction::Reboot),
                WhenIdle::Halt => return Some(PowerAction::Halt),
            }
        }
        let timeout = timeout_until(self.clock.now(), self.services.next_deadline());
        let ready = self.poll(timeout);
        if ready.signals {
            if let Some(action) = self.handle_signals() {
                return Some(action);
            }
        }
        if ready.control.iter().any(|r| *r) {
            if let Some(action) = self.handle_control(&ready.control) {
                return Some(action);
            }
        }
        if let Some(path) = crate::input::check_ready(&mut self.buttons, &ready.buttons) {
            info!("power button pressed ({})", path.display());
            return Some(PowerAction::Poweroff);
        }
        if ready.pipes.iter().any(|r| *r) {
            self.services.drain_output(&ready.pipes);
        }
        None
    }

    fn poll(&self, timeout: PollTimeout) -> Ready {
        let control_fds = self
            .control
            .as_ref()
            .map(|c| c.poll_fds())
            .unwrap_or_default();
        let button_fds: Vec<BorrowedFd<'_>> = self.buttons.iter().map(|b| b.as_fd()).collect();
        let pipe_fds = self.services.pipe_fds();
        poll_all(
            self.sfd.as_fd(),
            &control_fds,
            &button_fds,
            &pipe_fds,
            timeout,
        )
    }

    /// True if something the loop watches is ready right now, i.e. the next turn would not
    /// sleep. With nothing happening this must be false, or the loop spins.
    pub fn ready_now(&self) -> bool {
        let r = self.poll(PollTimeout::ZERO);
        r.signals || [r.control, r.buttons, r.pipes].iter().flatten().any(|x| *x)
    }

    /// Waits for the setup child ([`crate::setup`]) to finish, for at most `timeout`,
    /// while answering signals and the control socket. Returns a shutdown requested
    /// meanwhile. Past the deadline init goes on without it (what it reported so far
    /// counts) and says so.
    pub fn wait_for_setup(&mut self, setup: &mut Setup, timeout: Duration) -> Option<PowerAction> {
        let deadline = self.clock.now().saturating_add(timeout);
        let worker = setup.pid();
        while !setup.finished() {
            let now = self.clock.now();
            if now >= deadline {
                error!(
                    "setup (pid {worker}: kernel modules, device binding) still running after \
                     {} ms (a driver stuck in the kernel?): going on without it",
                    timeout.as_millis()
                );
                return None;
            }
            let (signals, control, report) = {
                let control_fds = self
                    .control
                    .as_ref()
                    .map(|c| c.poll_fds())
                    .unwrap_or_default();
                let mut g = poll_groups(
                    &[&[self.sfd.as_fd()], &control_fds, &[setup.as_fd()]],
                    timeout_until(now, Some(deadline)),
                )
                .into_iter();
                let mut next = || g.next().unwrap_or_default();
                let s = next().first().copied().unwrap_or(false);
                let c = next();
                let r = next().first().copied().unwrap_or(false);
                (s, c, r)
            };
            if report && setup.read() {
                debug!("setup (pid {worker}) finished");
            }
            if signals {
                if let Some(action) = self.handle_signals() {
                    return Some(action);
                }
            }
            if control.iter().any(|r| *r) {
                if let Some(action) = self.handle_control(&control) {
                    return Some(action);
                }
            }
        }
        None
    }

    fn handle_signals(&mut self) -> Option<PowerAction> {
        let mut request = None;
        for signo in signals::read_pending(&self.sfd) {
            let Ok(sig) = Signal::try_from(signo) else {
                debug!("ignoring signal {signo}");
                continue;
            };
            match signals::action(sig) {
                SignalAction::Reap => self.services.reap(&self.clock),
                SignalAction::Ignore => debug!("ignoring {sig}"),
                SignalAction::Reboot => request = request.or(Some((sig, PowerAction::Reboot))),
                SignalAction::Poweroff => request = request.or(Some((sig, PowerAction::Poweroff))),
                SignalAction::Halt => request = request.or(Some((sig, PowerAction::Halt))),
            }
        }
        let (sig, action) = request?;
        info!("received {sig}");
        Some(action)
    }

    fn handle_control(&mut self, ready: &[bool]) -> Option<PowerAction> {
        let control = self.control.as_mut()?;
        if ready.first().copied().unwrap_or(false) {
            control.accept_pending();
        }
        let services = &self.services;
        let commands = control.serve(&mut || services.status(), true);
        let cmd = commands.first()?;
        info!("control socket: {cmd:?} requested");
        Some(match cmd {
            Command::Poweroff => PowerAction::Poweroff,
            Command::Reboot => PowerAction::Reboot,
        })
    }

    /// Waits up to `timeout` for a signal or output while shutting down: drains the
    /// signalfd (the caller reaps) and the output pipes; answers status requests only.
    pub fn shutdown_wait(&mut self, timeout: Duration) {
        wait_once(
            &self.sfd,
            &mut self.services,
            self.control.as_mut(),
            timeout,
        );
    }

    /// The whole stop sequence for the supervised children (reverse start order, SIGTERM,
    /// stop timeout, SIGKILL).
    pub fn stop_services(&mut self) {
        let sfd = &self.sfd;
        let mut control = self.control.as_mut();
        let clock = self.clock;
        self.services.stop_all(&clock, &mut |services, timeout| {
            wait_once(sfd, services, control.as_deref_mut(), timeout)
        });
    }

    /// kill(-1) stage (PID 1 only).
    pub fn kill_everything(&mut self, grace: Duration) {
        let sfd = &self.sfd;
        let mut control = self.control.as_mut();
        let clock = self.clock;
        crate::shutdown::kill_everything(&mut self.services, &clock, grace, &mut |s, t| {
            wait_once(sfd, s, control.as_deref_mut(), t)
        });
    }

    /// Reaps what is left (bounded), without kill(-1): for the non-PID-1 test mode.
    pub fn reap_remaining(&mut self, timeout: Duration) -> bool {
        let sfd = &self.sfd;
        let mut control = self.control.as_mut();
        let clock = self.clock;
        crate::shutdown::reap_until_none(&mut self.services, &clock, timeout, &mut |s, t| {
            wait_once(sfd, s, control.as_deref_mut(), t)
        })
    }
}

fn wait_once(
    sfd: &SignalFd,
    services: &mut Services,
    control: Option<&mut ControlServer>,
    timeout: Duration,
) {
    let t = timeout_until(Duration::ZERO, Some(timeout));
    let ready = {
        let control_fds = control.as_ref().map(|c| c.poll_fds()).unwrap_or_default();
        let pipe_fds = services.pipe_fds();
        poll_all(sfd.as_fd(), &control_fds, &[], &pipe_fds, t)
    };
    if ready.signals {
        // Only SIGCHLD matters now; the caller reaps after we return.
        let _ = signals::read_pending(sfd);
    }
    if ready.pipes.iter().any(|r| *r) {
        services.drain_output(&ready.pipes);
    }
    if let Some(control) = control {
        if ready.control.first().copied().unwrap_or(false) {
            control.accept_pending();
        }
        if ready.control.iter().any(|r| *r) {
            let _ = control.serve(&mut || services.status(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fault injection: a power button whose device went away, faked with a pipe whose
    /// writer has closed (it polls ready forever and reads end-of-file, as a vanished
    /// evdev node polls POLLHUP|POLLERR and reads ENODEV). One turn of the loop drops it;
    /// after that nothing is ready, so the loop sleeps instead of spinning.
    #[test]
    fn a_power_button_that_goes_away_leaves_the_poll_set_fake_device_is_a_hung_up_pipe() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK).unwrap();
        drop(w);
        let gone = PowerButton::for_test(std::path::PathBuf::from("/dev/input/event9"), r.into());
        let mut rt = Runtime {
            clock: Clock::new(),
            services: Services::default(),
            sfd: crate::signals::signal_fd().unwrap(),
            control: None,
            buttons: vec![gone],
            when_idle: WhenIdle::Stay,
        };
        assert!(rt.ready_now(), "the fake vanished device must poll ready");
        assert_eq!(rt.step(), None, "a vanished button is not a press");
        assert!(
            rt.buttons.is_empty(),
            "the vanished button is still watched"
        );
        assert!(
            !rt.ready_now(),
            "the loop would wake again at once: it spins"
        );
    }

    #[test]
    fn timeouts_round_up() {
        assert_eq!(timeout_until(Duration::ZERO, None), PollTimeout::NONE);
        let t = timeout_until(Duration::from_millis(5), Some(Duration::from_micros(5001)));
        assert_eq!(t, PollTimeout::try_from(1i32).unwrap());
        let t = timeout_until(Duration::from_millis(9), Some(Duration::from_millis(5)));
        assert_eq!(t, PollTimeout::ZERO);
    }
}
