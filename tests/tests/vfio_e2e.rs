//! PCI passthrough end to end: inside a QEMU-emulated Bulkhead host (L1: q35, intel-iommu,
//! QEMU's edu device, a virtio-rng behind a PCIe root port), init binds both to vfio-pci as the
//! policy says; one bulkhead-vmm passes both through to one L2 guest. There, bulkhead-edu drives
//! edu (registers, factorials, INTx, MSI, DMA) and the guest kernel's virtio_rng drives the rng
//! over MSI-X. A second VM the policy lets own edu (one running owner at a time) is not started
//! while edu-vm runs, and a VMM outside the policy is refused. After the VM ends both are still bound to
//! vfio-pci, the rng was reset at VM start and end, and its virtio status, read from L1, is back
//! to its reset value.

use std::time::Duration;

use bulkhead_tests::{End, Host};

const EDU: &str = "0000:00:03.0";
const RNG: &str = "0000:01:00.0";

#[test]
fn edu_and_virtio_rng_driver_vm_intx_msi_msix_dma_reset_and_a_second_vm_is_refused() {
    bulkhead_tests::retry_on_emulator_reset(
        "edu_and_virtio_rng_driver_vm_intx_msi_msix_dma_reset_and_a_second_vm_is_refused",
        edu_and_virtio_rng_driver_vm_intx_msi_msix_dma_reset_and_a_second_vm_is_refused_once,
    );
}

fn edu_and_virtio_rng_driver_vm_intx_msi_msix_dma_reset_and_a_second_vm_is_refused_once() {
    let mut h = Host::boot("vfio");
    h.expect("bulkhead-init: started edu-vm pid");
    // The L2 guest runs both checks at once; their lines interleave, so wait for the VM's end
    // and look at the whole console afterwards.
    h.expect_within(
        "bulkhead-init: edu-vm exited with status",
        Duration::from_secs(900),
    );
    // rng-check may end before or after edu-vm (the VMM releases the device before it exits);
    // the host powers off only when both have.
    h.expect_end(End::PowerOff);
    h.assert_never_saw("Kernel panic");
    h.assert_never_saw("edu: FAIL");
    h.assert_never_saw("hwrng: FAIL");
    h.assert_never_saw("vfio-check: FAIL");
    let lines = h.lines().to_vec();
    let ctx = h.context();
    let saw = |needle: &str| lines.iter().any(|l| l.contains(needle));
    let want = |needles: &[&str]| {
        assert!(
            lines.iter().any(|l| needles.iter().all(|n| l.contains(n))),
            "no console line with all of {needles:?}\n{ctx}"
        )
    };
    // L1: init bound both (the rng's grant requires a reset method: it has one).
    want(&[&format!("bound {EDU} to vfio-pci")]);
    want(&[&format!("bound {RNG} to vfio-pci")]);
    // Init handed edu-vm's VMM a fresh container and both groups (the policy grants both
    // devices to edu-vm); the VMM adopted them instead of opening /dev/vfio itself.
    want(&[
        "edu-vm: handing over",
        "VFIO container as fd 3",
        "IOMMU group",
    ]);
    want(&["vfio: IOMMU group", "from a handed-over descriptor"]);
    // ... and ran as its own unprivileged user: VFIO needs no privilege once init has
    // handed over the descriptors (and lifted the locked-memory limit for DMA pinning).
    want(&[
        "edu-vm: bulkhead-vmm: INFO: running as uid 1001 gid 1001, no capabilities, no_new_privs 1",
    ]);
    want(&["edu-vm: handing over", "/dev/kvm as fd"]);
    // The VMM: edu's BAR mapped and INTx wired; the rng reset at start, its MSI-X emulated.
    want(&[&format!("vfio {EDU}: BAR 0 0x100000 bytes at")]);
    want(&[&format!("vfio {EDU}: INTx on GSI")]);
    // The guest's PCI core turns memory decoding off while it sizes BARs: the mapped BAR's
    // slot goes away and comes back (and edu's registers work afterwards, below).
    want(&[&format!(
        "vfio {EDU}: memory decoding off: mapped BARs removed"
    )]);
    want(&[&format!(
        "vfio {EDU}: memory decoding on: mapped BARs back in place"
    )]);
    want(&[&format!(
        "vfio {EDU}: no reset method; not reset at VM start"
    )]);
    want(&[&format!("vfio {RNG}: reset at VM start")]);
    want(&[&format!("vfio {RNG}: MSI-X "), "(emulated)"]);
    // Inside L2, edu: identification, liveness, five factorials, INTx, MSI, DMA.
    want(&["edu: found 1234:11e8 at"]);
    want(&["edu: identification 0x010000ed"]);
    want(&["edu: liveness 0x12345678 -> 0xedcba987"]);
    for (n, f) in [(0, 1), (1, 1), (5, 120), (10, 3628800), (12, 479001600)] {
        want(&[&format!("edu: {n}! = {f}")]);
    }
    want(&["edu: interrupt received (INTx"]);
    // MSI: the VMM followed the guest's capability, and the message arrived with the vector
    // the guest programmed (0xf5, one Linux leaves unused: the guest kernel counted it as a
    // spurious interrupt in /proc/interrupts), so it came as MSI through the VMM's route.
    want(&[&format!("vfio {EDU}: MSI enabled (GSI"), "data 0xf5"]);
    want(&[
        "edu: interrupt received (MSI, vector 0xf5: spurious-interrupt count",
        "7! = 5040",
    ]);
    want(&[&format!("vfio {EDU}: MSI disabled")]);
    want(&["edu: DMA 2048 bytes RAM"]);
    want(&["edu: PASS"]);
    // Inside L2, the rng under the guest kernel's driver, over MSI-X.
    want(&[&format!("vfio {RNG}: MSI-X enabled (")]);
    want(&["hwrng: virtio", "virtio status 0x0000000f"]);
    want(&["hwrng: read 64 bytes from /dev/hwrng"]);
    want(&["hwrng: /proc/interrupts:", "(msix)"]);
    want(&["hwrng:", "MSI-X vectors; the request queue's fired"]);
    want(&["hwrng: PASS"]);
    // VM end: reset, still bound to vfio-pci; from L1, the status the guest's driver left
    // (0xf) reads as its reset value.
    want(&[&format!("vfio {RNG}: reset at VM end")]);
    // (The VMM was handed descriptors and has no sysfs paths: L1's checkers look.)
    want(&[&format!("vfio-check: {EDU} was released")]);
    want(&[&format!("vfio-check: {EDU} 1234:11e8 driver=vfio-pci")]);
    want(&["edu-check exited with status 0"]);
    want(&[&format!("vfio-check: {RNG} was released")]);
    want(&[
        &format!("vfio-check: {RNG} 1af4:1044 driver=vfio-pci"),
        "reset_method=",
        "flr",
    ]);
    want(&[&format!("vfio-check: {RNG} BAR 4 + 0x14 = 0x00")]);
    // Only an explicit request hands a function back to the host.
    want(&[&format!(
        "vfio-check: {RNG} released to the host from vfio-pci: driver=none"
    )]);
    want(&["vfio-check: OK"]);
    want(&["edu-vm exited with status 0"]);
    want(&["rng-check exited with status 0"]);
    // second-vm, which the policy lets own edu only while edu-vm is not running, was not
    // started, and init said why and who holds the device.
    want(&[
        "bulkhead-init: second-vm could not start:",
        "IOMMU group",
        "is in use by edu-vm, which is running",
    ]);
    assert!(
        !saw("started second-vm pid"),
        "second-vm was started while edu-vm held edu\n{ctx}"
    );
    // A VM the policy grants nothing: its VMM refused to open edu by path.
    want(&[
        "vm ungranted-vm: cannot pass 0000:00:03.0 through: the policy grants this VM no PCI device",
    ]);
    want(&["ungranted-vm exited with status 1"]);
    // A VMM outside the policy, started while edu-vm held edu's group, was refused clearly.
    want(&[
        &format!("cannot pass {EDU} through: /dev/vfio/"),
        "is in use",
    ]);
    want(&["rogue-vmm exited with status 1"]);
    // edu has no reset method; its grants accept that, and init said so when binding it.
    want(&[
        &format!("{EDU} (for edu-vm, second-vm) has no reset method"),
        "reset=optional",
    ]);
}
