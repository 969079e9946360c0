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

/// Is this the emulated host kernel's own panic line, and a crash of the emulator rather
/// than of Bulkhead? User space cannot crash a kernel, except by init dying (`Attempted to
/// kill init`); every other host kernel panic seen is QEMU TCG's nested SVM (README's known
/// flakes), which the tests run again.
pub fn is_emulator_crash(line: &str) -> bool {
    is_host_kernel_panic(line) && !line.contains("Attempted to kill init")
}

/// How many times an end-to-end test, or README's first command in its test, is run again
/// after an emulator crash. Two, because one test met two different crashes of QEMU TCG's
/// nested SVM in a row in CI (a stack-guard hit, then a soft lockup).
pub const EMULATOR_RERUNS: usize = 2;

/// How init says a VMM ended because its guest's CPU crashed (the VMM's exit status 3: a
/// triple fault, under nested emulation now and then).
pub const VMM_GUEST_CRASH_STATUS: &str = "exited with status 3";

/// Is this init's own line saying a VMM's guest crashed (`bulkhead-init: <svc> exited with
/// status 3`; a relayed VM line starts with its service's name instead)?
pub fn is_guest_crash(line: &str) -> bool {
    line.strip_prefix("bulkhead-init: ")
        .is_some_and(|r| r.ends_with(VMM_GUEST_CRASH_STATUS))
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

    #[test]
    fn an_emulator_crash_is_a_host_kernel_panic_but_not_init_dying() {
        assert!(is_emulator_crash(
            "[   98.185039] Kernel panic - not syncing: corrupted stack end detected inside scheduler"
        ));
        assert!(!is_emulator_crash(
            "[    5.123456] Kernel panic - not syncing: Attempted to kill init! exitcode=0x7f00"
        ));
        assert!(!is_emulator_crash(
            "vm: [    1.0] Kernel panic - not syncing: oops"
        ));
        assert!(is_guest_crash("bulkhead-init: gui-vm exited with status 3"));
        assert!(!is_guest_crash(
            "gui-vm: bulkhead-init: x exited with status 3"
        ));
        assert!(!is_guest_crash(
            "bulkhead-init: gui-vm exited with status 0"
        ));
    }
}
