//! bulkhead-vmm end to end: inside a QEMU-emulated Bulkhead host (L1), our init starts
//! bulkhead-vmm, which boots the Debian cloud kernel (L2) on nested KVM; the host's orderly
//! power-off then stops the VM through its ACPI power button. Once with the default kernel
//! and once with host and guest on the second (the build machine's backports: 6.12 on
//! Debian 12), so a kernel change is caught.

use bulkhead_rootfs::kernel::plan::KernelOverrides;
use bulkhead_tests::{all_on_second_kernel, kernels, BootOptions, End, Host};

#[test]
fn vmm_boots_debian_with_two_cpus_rng_and_a_disk_the_host_reads_back() {
    bulkhead_tests::retry_on_emulator_reset(
        "vmm_boots_debian_with_two_cpus_rng_and_a_disk_the_host_reads_back",
        vmm_boots_debian_with_two_cpus_rng_and_a_disk_the_host_reads_back_once,
    );
}

fn vmm_boots_debian_with_two_cpus_rng_and_a_disk_the_host_reads_back_once() {
    vmm_boots(KernelOverrides::default());
}

#[test]
fn vmm_boots_debian_on_the_second_kernel_inside_a_host_on_the_second_kernel() {
    bulkhead_tests::retry_on_emulator_reset(
        "vmm_boots_debian_on_the_second_kernel_inside_a_host_on_the_second_kernel",
        vmm_boots_debian_on_the_second_kernel_inside_a_host_on_the_second_kernel_once,
    );
}

fn vmm_boots_debian_on_the_second_kernel_inside_a_host_on_the_second_kernel_once() {
    vmm_boots(all_on_second_kernel());
}

fn vmm_boots(over: KernelOverrides) {
    let want = kernels("vmm", &over);
    let disk = tempfile_disk(&over.tag());
    let mut h = Host::boot_with(
        "vmm",
        BootOptions {
            disk: Some(disk.clone()),
            kernels: over,
            ..Default::default()
        },
    );
    h.expect("bulkhead-init: started vm pid");
    // The VM runs under init's supervision (restart on failure): a VMM that exits 3 (a guest
    // triple fault, the known nested-emulation flake) is restarted and the harness reports
    // it; any other restart fails the test.
    h.expect_within(
        "bulkhead-init: vm exited with status 0",
        std::time::Duration::from_secs(400),
    );
    h.expect_end(End::PowerOff);
    h.assert_never_saw("Kernel panic");
    // The VMM ran jailed, with the host disk handed over as a descriptor.
    assert!(
        h.saw("bulkhead-init: vm jailed: uid 1010 gid 1010, CapEff 0x0 CapPrm 0x0 CapBnd 0x0 CapAmb 0x0, NoNewPrivs 1, own mnt ipc uts net pid namespaces, cgroup /bulkhead/vm"),
        "the VMM ran unjailed\n{}",
        h.context()
    );
    let line = |needle: &str| {
        h.lines()
            .iter()
            .rev()
            .find(|l| l.contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no line with {needle:?}\n{}", h.context()))
    };
    // The host loaded its modules from the image (built for the host kernel's release), and
    // the guest runs the kernel chosen for it.
    assert!(
        h.saw("bulkhead-init: loaded module kvm_amd"),
        "{}",
        h.context()
    );
    line(&format!(
        "vm: check: testprog: kernel {}",
        want.guest("check").abi
    ));
    // The guest's own small init (bulkhead-guest-init) reports through the VMM's serial port.
    line("vm: bulkhead-guest-init: ready");
    line("vm: check: testprog: cpus online 0-1");
    let rng = line("vm: check: testprog: hwrng ");
    let rng_hex = rng.rsplit(' ').next().unwrap_or_default().to_string();
    assert_eq!(rng_hex.len(), 32, "{rng}");
    assert_ne!(rng_hex, "0".repeat(32), "virtio-rng gave zeros");
    let written = line("vm: check: testprog: disk marker written ");
    assert!(written.ends_with(&rng_hex), "{written} vs {rng}");
    line("vm: bulkhead-guest-init: check exited with status 0");
    // The host's orderly power-off stopped the VM the way a host should: init sent the VMM
    // SIGTERM, the VMM pressed the guest's ACPI power button, the guest's init stopped its
    // program and powered off, and the VMM ended with status 0.
    line("stopper: testprog: \"BULKHEAD-CHECK-DONE\" is in /dev/vda");
    line("vm: bulkhead-vmm: INFO: SIGTERM: pressing the guest's power button");
    line("vm: bulkhead-guest-init: power button pressed");
    line("vm: bulkhead-guest-init: idle killed by signal SIGTERM");
    line("vm: bulkhead-guest-init: powering off");

    // The guest wrote through its virtio-blk into the host's virtio-blk: the bytes are on
    // the build machine's disk image now.
    let data = std::fs::read(&disk).expect("read the disk image");
    let want = format!("BULKHEAD-DISK-MARKER {rng_hex}\n");
    assert!(
        data.starts_with(want.as_bytes()),
        "disk starts with {:?}",
        String::from_utf8_lossy(&data[..64.min(data.len())])
    );
    let _ = std::fs::remove_file(&disk);
}

fn tempfile_disk(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("bulkhead-vmm-disk-{}{tag}.img", std::process::id()));
    std::fs::write(&p, vec![0u8; 1 << 20]).expect("create the disk image");
    p
}
