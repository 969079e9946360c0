//! Booting the way a real machine does: UEFI firmware (Debian's OVMF) starts the host's
//! unified kernel image (Debian's systemd-stub, the host kernel, the host image and the
//! kernel command line in one EFI executable, as `bulkhead-rootfs build --efi` writes it)
//! from an EFI system partition, with no `-kernel`. One short boot of a small system (CI
//! time); the example itself was booted this way by hand (docs/testing.md).

use bulkhead_tests::{BootOptions, End, Host};

/// An option init does not know: it says so in its own line, which shows that the command
/// line baked into the image's `.cmdline` section reached the kernel and init.
const MARKER: &str = "bulkhead.efi_test_marker";

#[test]
fn the_efi_image_boots_under_ovmf_runs_init_as_pid1_and_powers_off() {
    let mut h = Host::boot_with(
        "supervise",
        BootOptions {
            efi: true,
            append: format!("{MARKER}=1"),
            restarts_allowed: vec!["crashy".into()],
            ..Default::default()
        },
    );
    let qemu = h.command_line().to_string();
    assert!(
        qemu.contains("if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE"),
        "{qemu}"
    );
    assert!(
        qemu.contains("-device virtio-blk-pci,drive=esp,bootindex=0"),
        "{qemu}"
    );
    for never in ["-kernel", "-initrd", "-append"] {
        assert!(!qemu.contains(never), "{never} in {qemu}");
    }
    // Init's own lines, at line start: the image's command line, then supervision.
    h.expect(&format!("bulkhead-init: unknown option {MARKER} ignored"));
    h.expect("crashy: testprog: start uptime_ms=");
    h.expect("bulkhead-init: crashy exited with status 3");
    h.expect("bulkhead-init: crashy failed: start limit reached (4 starts in ");
    h.expect("bulkhead-init: all services ended");
    // QEMU's own SHUTDOWN event says the guest powered itself off.
    h.expect_end(End::PowerOff);
}
