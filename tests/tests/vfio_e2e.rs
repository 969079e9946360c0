//! PCI passthrough end to end: inside a QEMU-emulated Bulkhead host (L1: q35, intel-iommu,
//! QEMU's edu device), init binds edu to vfio-pci as the policy says; bulkhead-vmm passes it
//! through to an L2 guest whose bulkhead-edu drives it. A second VMM asking for the same device
//! is refused, and after the VM ends edu is still bound to vfio-pci.

use bulkhead_tests::{End, Host};

#[test]
fn edu_driver_vm_computes_gets_its_interrupt_and_dma_and_a_second_vmm_is_refused() {
    let mut h = Host::boot("vfio");
    h.expect("bound 0000:00:03.0 to vfio-pci");
    h.expect("bulkhead-init: started edu-vm pid");
    h.expect("vfio 0000:00:03.0: BAR 0 0x100000 bytes at");
    h.expect("vfio 0000:00:03.0: INTx on GSI");
    // Inside L2: the driver program.
    h.expect("edu: found 1234:11e8 at");
    h.expect("edu: identification 0x010000ed");
    h.expect("edu: liveness 0x12345678 -> 0xedcba987");
    for (n, f) in [(0, 1), (1, 1), (5, 120), (10, 3628800), (12, 479001600)] {
        h.expect(&format!("edu: {n}! = {f}"));
    }
    h.expect("edu: interrupt received (INTx");
    h.expect("edu: DMA 2048 bytes RAM");
    h.expect("edu: PASS");
    h.expect("vfio 0000:00:03.0: released, still bound to vfio-pci");
    h.expect("bulkhead-init: edu-vm exited with status 0");
    h.expect_end(End::PowerOff);
    h.assert_never_saw("Kernel panic");
    h.assert_never_saw("edu: FAIL");
    // The second VMM, started while the first held the group (its lines interleave with the
    // guest's, so they are looked for in the whole console), was refused clearly.
    let saw = |needle: &str| h.lines().iter().any(|l| l.contains(needle));
    assert!(
        saw("cannot pass 0000:00:03.0 through: /dev/vfio/") && saw("is in use"),
        "the second VMM was not refused with a clear error\n{}",
        h.context()
    );
    assert!(
        saw("second-vm exited with status 1"),
        "the second VMM did not fail\n{}",
        h.context()
    );
}
