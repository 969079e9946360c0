//! The panic hook of PID 1. If init panics, the kernel would otherwise panic too
//! ("Attempted to kill init!"). The hook logs the message to the console and kmsg, syncs,
//! and powers the machine off; it never returns, so neither unwinding nor abort runs.

use nix::sys::reboot::{reboot, RebootMode};

/// Installs the hook when this process is PID 1 (the client keeps Rust's default hook).
pub fn install() {
    if std::process::id() != 1 {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_string()
        };
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        crate::log::emergency(&format!("panic: {msg}{location}"));
        if std::process::id() != 1 {
            // A child PID 1 forked without exec (the setup child) inherits this hook: it
            // must end itself, not the machine.
            // SAFETY: _exit ends this process at once; nothing of PID 1's runs.
            unsafe { libc::_exit(101) }
        }
        crate::log::emergency("powering off");
        nix::unistd::sync();
        let _ = reboot(RebootMode::RB_POWER_OFF);
        loop {
            nix::unistd::pause();
        }
    }));
}
