//! Why the VM stopped, and the one-shot signal that carries it from whoever noticed (a vCPU,
//! the power-management device, the control socket) to the main thread.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VMM ends. Each maps to a documented process exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest asked for a reboot (ACPI reset register, 8042 reset, triple fault).
    Reboot,
    /// A control client asked to kill the VM.
    Killed,
    /// The guest did something KVM cannot run (internal error, failed entry).
    GuestCrash(String),
    /// The VMM itself failed.
    VmmError(String),
}

impl ExitReason {
    /// The process exit status for this reason (documented in `--help` and docs/vmm.md).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Poweroff => 0,
            ExitReason::VmmError(_) => 1,
            ExitReason::Reboot => 3,
            ExitReason::Killed => 4,
            ExitReason::GuestCrash(_) => 5,
        }
    }
}

/// Set once; the first reason wins. The eventfd wakes the main loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh, unset signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::info!("bulkhead-vmm: exit requested: {reason:?}");
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            log::error!("bulkhead-vmm: cannot signal exit: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_are_distinct() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        s.request(ExitReason::Reboot);
        s.request(ExitReason::Poweroff);
        assert_eq!(s.reason(), Some(ExitReason::Reboot));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        let codes = [
            ExitReason::Poweroff,
            ExitReason::VmmError(String::new()),
            ExitReason::Reboot,
            ExitReason::Killed,
            ExitReason::GuestCrash(String::new()),
        ]
        .map(|r| r.exit_code());
        let mut sorted = codes.to_vec();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
        assert_eq!(codes[0], 0);
    }
}
