//! virtio_wl end to end: bulkhead-vmm's virtio_wl device, our guest kernel module and the
//! `bulkhead-wl` guest library, inside an L2 guest booted in a QEMU-emulated Bulkhead host.

use bulkhead_tests::{End, Host};

#[test]
fn l2_guest_exchanges_data_shared_memory_and_pipes_with_a_host_socket_by_name() {
    let mut h = Host::boot("wl");
    h.expect("peer: testprog: wl-peer listening on /run/wl-peer.sock");
    h.expect("vm: bulkhead-init: loaded module virtio_wl");
    h.expect_line("both sides report success", |l| {
        l.contains("FAIL:")
            || l.contains("testprog: wl guest ok")
            || l.contains("testprog: wl-peer ok")
    });
    h.expect_end(End::PowerOff);
    let saw = |needle: &str| h.lines().iter().any(|l| l.contains(needle));
    assert!(!saw("FAIL:"), "a side failed\n{}", h.context());
    assert!(
        saw("vm: check: testprog: wl guest ok"),
        "guest\n{}",
        h.context()
    );
    assert!(saw("peer: testprog: wl-peer ok"), "peer\n{}", h.context());
    assert!(
        saw("bulkhead-init: vm exited with status 0"),
        "{}",
        h.context()
    );
}
