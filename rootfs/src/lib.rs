//! Bulkhead's build side: provisioning (QEMU, and Debian kernels with their headers in a
//! cache), initramfs images (newc cpio), kernel module closures, and running images under
//! QEMU.

pub mod apt;
pub mod bench;
pub mod compressed;
pub mod cpio;
pub mod efi;
pub mod guest_root;
pub mod image;
pub mod kernel;
pub mod kmod;
pub mod modules;
pub mod provision;
pub mod qemu;
pub mod screens;

use std::path::PathBuf;

/// The workspace this crate was built in (images are built from it).
pub fn workspace_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The kernel command line every Bulkhead host boots with under QEMU. `no_timer_check`:
/// under software emulation on a loaded machine the kernel's IO-APIC timer check can fail
/// ("timer doesn't work through Interrupt-remapped IO-APIC") and panic at boot.
/// `softlockup_panic=1`: a CPU stuck in the kernel for over 20 s panics (the panic prints
/// that CPU's stack even under `quiet`) and, with `panic=-1`, the machine restarts, where it
/// would otherwise hang with every service stalled behind it; seen twice in the emulated
/// host (both CPUs at once, as init spawned a jailed service), never with a stack before.
/// `hung_task_panic=1`: a task stuck in uninterruptible sleep for over 120 s (the kernel's
/// hung-task timeout) panics the same way; seen on 2026-12-07 with a VMM's `virtio-wl`
/// thread blocked in the host kernel for 15 minutes while its guest's Wayland proxy waited
/// on it (cause not found), which otherwise stalls the whole desktop until a test's deadline.
pub const HOST_CMDLINE: &str = "console=ttyS0 panic=-1 softlockup_panic=1 hung_task_panic=1 quiet intel_iommu=on printk.devkmsg=on no_timer_check";
