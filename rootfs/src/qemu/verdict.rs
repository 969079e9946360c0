//! How a machine ended, from QEMU's own `SHUTDOWN` event and the emulated host kernel's own
//! lines (never from a line a nested VM's console relayed).

use super::KERNEL_PANIC;

/// How QEMU said the machine stopped (its `SHUTDOWN` event's `reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReason {
    /// `guest-shutdown`: the emulated host powered itself off (ACPI).
    GuestShutdown,
    /// `guest-reset`: it asked to restart (with `-no-reboot` QEMU then exits); a kernel
    /// panic with `panic=-1` ends this way too.
    GuestReset,
    /// `guest-panic`: a panic device reported it.
    GuestPanic,
    /// Anything else (`host-signal`, `host-qmp-quit`, …).
    Other(String),
}

impl ShutdownReason {
    pub(super) fn parse(reason: &str) -> Self {
        match reason {
            "guest-shutdown" => Self::GuestShutdown,
            "guest-reset" => Self::GuestReset,
            "guest-panic" => Self::GuestPanic,
            other => Self::Other(other.to_string()),
        }
    }
}

/// The message of a console line that the emulated host's kernel printed itself: its
/// `[ seconds]` stamp (if any) removed. Lines a nested VM's console relayed always start
/// with `<service>: ` and so never start with a kernel message's words.
pub fn host_kernel_message(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((stamp, msg)) = rest.split_once(']') {
            if stamp.trim().parse::<f64>().is_ok() {
                return msg.strip_prefix(' ').unwrap_or(msg);
            }
        }
    }
    line
}

/// Is this the emulated host kernel's own panic line (not a relayed VM's)?
pub fn is_host_kernel_panic(line: &str) -> bool {
    host_kernel_message(line).starts_with(KERNEL_PANIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::POWER_DOWN;

    #[test]
    fn only_the_host_kernels_own_lines_are_its_verdicts() {
        assert!(is_host_kernel_panic(
            "[    5.123456] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(is_host_kernel_panic("Kernel panic - not syncing: VFS"));
        // A nested VM's console, relayed by init with its service name first.
        assert!(!is_host_kernel_panic(
            "hello-vm: [    1.000000] Kernel panic - not syncing: oops"
        ));
        assert!(!is_host_kernel_panic("hello-vm: Kernel panic"));
        assert_eq!(
            host_kernel_message("[   12.5] reboot: Power down"),
            "reboot: Power down"
        );
        assert!(!host_kernel_message("edu-vm: reboot: Power down").starts_with(POWER_DOWN));
    }
}
