//! SIGTERM and SIGINT: how the host init (or a person) asks a VM to stop. The first asks the
//! guest to shut down through the ACPI power button, as a host's own power button would: the
//! guest's init stops its programs and powers off, and the VMM ends normally (status 0),
//! resetting passed-through devices and flushing disks on the way. A second signal stops the
//! VM at once (`Killed`, status 4): whoever sends it has stopped waiting.
//!
//! The signals are blocked in every thread (call [`block`] before any thread exists) and
//! taken by one thread with sigwait(2), so no handler runs in signal context.

use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

use super::exit::{ExitReason, ExitSignal};

fn stop_set() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it starts later.
pub fn block() -> nix::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&stop_set()), None)
}

/// Starts the thread that waits for the signals: the first calls `press` (the power
/// button), the second requests `ExitReason::Killed` on `exit`. It ends after the second.
pub fn spawn(
    press: Box<dyn Fn() -> std::io::Result<()> + Send>,
    exit: Arc<ExitSignal>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Control);
            let set = stop_set();
            let mut pressed = false;
            loop {
                let sig = match set.wait() {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("bulkhead-vmm: sigwait: {e}; SIGTERM will not be handled");
                        return;
                    }
                };
                if !pressed {
                    pressed = true;
                    log::info!("bulkhead-vmm: {sig}: pressing the guest's power button");
                    if let Err(e) = press() {
                        log::warn!("bulkhead-vmm: power button: {e}; stopping the VM now");
                        exit.request(ExitReason::Killed);
                        return;
                    }
                } else {
                    log::info!("bulkhead-vmm: {sig} again: stopping the VM now");
                    exit.request(ExitReason::Killed);
                    return;
                }
            }
        })
}
