//! Signals: PID 1 blocks every signal first thing and reads them from a signalfd.
//!
//! The kernel drops signals sent to PID 1 whose disposition is the default, but queues
//! blocked ones, so "block everything, read with signalfd" is what makes them arrive.
//! Meaning (busybox / s6 convention, plus systemd's SIGPWR):
//! SIGCHLD → reap; SIGINT (ctrl-alt-del once CAD is disabled) → reboot; SIGTERM → reboot;
//! SIGUSR1 → halt; SIGUSR2 and SIGPWR → power off. Everything else is logged and ignored.
//!
//! Children must not inherit the mask: `std::process::Command` resets the child's signal
//! mask to empty and SIGPIPE to its default before exec (init sets no other disposition).

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What a signal asks init to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Reap children.
    Reap,
    /// Orderly reboot.
    Reboot,
    /// Orderly power-off.
    Poweroff,
    /// Orderly halt.
    Halt,
    /// Nothing.
    Ignore,
}

/// The meaning of a signal to PID 1.
pub fn action(sig: Signal) -> SignalAction {
    match sig {
        Signal::SIGCHLD => SignalAction::Reap,
        Signal::SIGINT | Signal::SIGTERM => SignalAction::Reboot,
        Signal::SIGUSR1 => SignalAction::Halt,
        Signal::SIGUSR2 | Signal::SIGPWR => SignalAction::Poweroff,
        _ => SignalAction::Ignore,
    }
}

/// Blocks every signal in the calling thread (call before any thread exists).
pub fn block_all() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), None)
}

/// A non-blocking, close-on-exec signalfd for every signal.
pub fn signal_fd() -> nix::Result<SignalFd> {
    SignalFd::with_flags(
        &SigSet::all(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )
}

/// Reads every pending signal (bounded), returning their numbers.
pub fn read_pending(sfd: &SignalFd) -> Vec<i32> {
    let mut out = Vec::new();
    for _ in 0..64 {
        match sfd.read_signal() {
            Ok(Some(info)) => out.push(info.ssi_signo as i32),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// Turns ctrl-alt-del into SIGINT for PID 1 instead of an immediate reboot.
pub fn disable_ctrl_alt_del() -> nix::Result<()> {
    nix::sys::reboot::set_cad_enabled(false)
}

/// In a child, between fork and exec (async-signal-safe, allocates nothing): an empty
/// signal mask and default dispositions. Init blocks every signal, and the mask survives
/// exec; std's spawn does not reset it on this toolchain (the supervise test checks
/// /proc/<pid>/status of a real child).
pub fn reset_in_child(sigrtmax: i32) -> std::io::Result<()> {
    // SAFETY: sigemptyset/sigprocmask/signal are async-signal-safe and get valid
    // arguments; the sigset lives on this stack frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for sig in 1..=sigrtmax {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conventions() {
        assert_eq!(action(Signal::SIGCHLD), SignalAction::Reap);
        assert_eq!(action(Signal::SIGINT), SignalAction::Reboot);
        assert_eq!(action(Signal::SIGTERM), SignalAction::Reboot);
        assert_eq!(action(Signal::SIGUSR1), SignalAction::Halt);
        assert_eq!(action(Signal::SIGUSR2), SignalAction::Poweroff);
        assert_eq!(action(Signal::SIGPWR), SignalAction::Poweroff);
        assert_eq!(action(Signal::SIGHUP), SignalAction::Ignore);
        assert_eq!(action(Signal::SIGWINCH), SignalAction::Ignore);
    }
}
