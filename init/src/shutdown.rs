//! The end of the host: after the services are stopped (see
//! [`crate::services::Services::stop_all`]), everything else gets SIGTERM, a grace time,
//! then SIGKILL; init reaps until no child is left, syncs, unmounts in reverse order
//! (lazily if busy) and calls reboot(2). If reboot returns, init pauses forever: PID 1
//! never exits.

use std::path::PathBuf;
use std::time::Duration;

use log::{error, info, warn};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

use crate::services::{Clock, Services};

/// How the machine ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// RB_POWER_OFF.
    Poweroff,
    /// RB_AUTOBOOT.
    Reboot,
    /// RB_HALT_SYSTEM.
    Halt,
}

impl PowerAction {
    /// Short name: `poweroff`, `reboot`, `halt`.
    pub fn name(self) -> &'static str {
        match self {
            PowerAction::Poweroff => "poweroff",
            PowerAction::Reboot => "reboot",
            PowerAction::Halt => "halt",
        }
    }

    /// The message logged last, right before reboot(2).
    pub fn message(self) -> &'static str {
        match self {
            PowerAction::Poweroff => "powering off",
            PowerAction::Reboot => "rebooting",
            PowerAction::Halt => "halting",
        }
    }

    /// The reboot(2) command.
    pub fn mode(self) -> RebootMode {
        match self {
            PowerAction::Poweroff => RebootMode::RB_POWER_OFF,
            PowerAction::Reboot => RebootMode::RB_AUTOBOOT,
            PowerAction::Halt => RebootMode::RB_HALT_SYSTEM,
        }
    }
}

/// True while any child (ours or an adopted orphan) exists, exited or not.
pub fn have_children() -> bool {
    // WNOWAIT: look without reaping; ECHILD means there is nobody left.
    !matches!(
        waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Err(nix::errno::Errno::ECHILD)
    )
}

/// Reaps until no child is left or `timeout` passes; true if none is left.
pub fn reap_until_none(
    services: &mut Services,
    clock: &Clock,
    timeout: Duration,
    wait: &mut dyn FnMut(&mut Services, Duration),
) -> bool {
    let deadline = clock.now().saturating_add(timeout);
    loop {
        services.reap(clock);
        if !have_children() {
            return true;
        }
        let now = clock.now();
        if now >= deadline {
            return false;
        }
        wait(services, (deadline - now).min(Duration::from_millis(200)));
    }
}

/// kill(-1, SIGTERM), grace, kill(-1, SIGKILL), reap. Only for PID 1: kill(-1) reaches
/// every process but init itself.
pub fn kill_everything(
    services: &mut Services,
    clock: &Clock,
    grace: Duration,
    wait: &mut dyn FnMut(&mut Services, Duration),
) {
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if !reap_until_none(services, clock, grace, wait) {
        info!("sending SIGKILL to remaining processes");
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        if !reap_until_none(services, clock, Duration::from_secs(5), wait) {
            warn!("some processes could not be reaped; going on");
        }
    }
}

/// Announces the end, syncs, unmounts in reverse, calls reboot(2). Never returns.
pub fn finish(action: PowerAction, mounted: &[PathBuf]) -> ! {
    let dropped = crate::log::dropped_lines();
    if dropped > 0 {
        warn!("{dropped} console lines were dropped in all (the console was busy or stopped; kmsg has init's own)");
    }
    info!("{}", action.message());
    nix::unistd::sync();
    crate::mounts::unmount_all(mounted);
    nix::unistd::sync();
    let err = match reboot(action.mode()) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    error!("reboot(2) failed: {err}; pausing forever");
    loop {
        nix::unistd::pause();
    }
}
