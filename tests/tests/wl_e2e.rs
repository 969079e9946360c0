//! virtio_wl end to end: bulkhead-vmm's virtio_wl device, our guest kernel module and the
//! `bulkhead-wl` guest library, inside an L2 guest booted in a QEMU-emulated Bulkhead host.
//! The exchange with a host socket runs twice: on the default kernel, and with the guest on
//! the second (the build machine's backports: 6.12 on Debian 12, its module built against
//! that kernel's headers) inside a host on the default one.

use bulkhead_rootfs::kernel::plan::KernelOverrides;
use bulkhead_tests::{guests_on_second_kernel, kernels, BootOptions, End, Host};

#[test]
fn l2_guest_exchanges_data_shared_memory_and_pipes_with_a_host_socket_by_name() {
    bulkhead_tests::retry_on_emulator_reset(
        "l2_guest_exchanges_data_shared_memory_and_pipes_with_a_host_socket_by_name",
        l2_guest_exchanges_data_shared_memory_and_pipes_with_a_host_socket_by_name_once,
    );
}

fn l2_guest_exchanges_data_shared_memory_and_pipes_with_a_host_socket_by_name_once() {
    wl_exchange("wl", KernelOverrides::default());
}

#[test]
fn l2_guest_on_the_second_kernel_exchanges_with_a_host_socket_inside_a_default_host() {
    bulkhead_tests::retry_on_emulator_reset(
        "l2_guest_on_the_second_kernel_exchanges_with_a_host_socket_inside_a_default_host",
        l2_guest_on_the_second_kernel_exchanges_with_a_host_socket_inside_a_default_host_once,
    );
}

fn l2_guest_on_the_second_kernel_exchanges_with_a_host_socket_inside_a_default_host_once() {
    wl_exchange("wl", guests_on_second_kernel());
}

/// Fault injection (the VMM's hidden `--test-drop-wl-interrupts 3`): the device uses the
/// guest's buffers but sends none of its first three interrupts, as an interrupt lost on
/// its way into a nested guest does. With EVENT_IDX one lost interrupt silences its queue
/// for good (the driver's `used_event` stays behind), so without the driver's sweep the
/// first command's caller waits forever; with it the whole exchange ends as usual.
#[test]
fn fault_injected_lost_wl_interrupts_are_found_by_the_guest_drivers_sweep() {
    bulkhead_tests::retry_on_emulator_reset(
        "fault_injected_lost_wl_interrupts_are_found_by_the_guest_drivers_sweep",
        fault_injected_lost_wl_interrupts_are_found_by_the_guest_drivers_sweep_once,
    );
}

fn fault_injected_lost_wl_interrupts_are_found_by_the_guest_drivers_sweep_once() {
    let h = wl_exchange("wl-lost-interrupt", KernelOverrides::default());
    let dropped = h
        .lines()
        .iter()
        .filter(|l| l.starts_with("vm: bulkhead-vmm: WARN: virtio-wl: fault injection: queue"))
        .count();
    assert_eq!(
        dropped,
        3,
        "the VMM dropped {dropped} interrupts\n{}",
        h.context()
    );
}

fn wl_exchange(system: &str, over: KernelOverrides) -> Host {
    let want = kernels(system, &over);
    let mut h = Host::boot_with(
        system,
        BootOptions {
            kernels: over,
            ..Default::default()
        },
    );
    // The VMM is jailed; its "socket" is a socketpair end init handed to it and the peer.
    h.expect("peer: testprog: wl-peer serving the handed-over fd=");
    h.expect("vm: bulkhead-guest-init: loaded module virtio_wl");
    h.expect(&format!(
        "vm: check: testprog: kernel {}",
        want.guest("wl").abi
    ));
    h.expect_line("both sides report success", |l| {
        l.contains("FAIL:")
            || l.contains("testprog: wl guest ok")
            || l.contains("testprog: wl-peer ok")
    });
    h.expect_end(End::PowerOff);
    let saw = |needle: &str| h.saw(needle);
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
    assert!(saw(JAILED_VM), "the VMM ran unjailed\n{}", h.context());
    h
}

/// Init's line for the wl system's VMM, entered into its jail.
const JAILED_VM: &str = "bulkhead-init: vm jailed: uid 1020 gid 1020, CapEff 0x0 CapPrm 0x0 CapBnd 0x0 CapAmb 0x0, NoNewPrivs 1, own mnt ipc uts net pid namespaces, cgroup /bulkhead/vm";

/// Every `PASS` line the faux-accept system must print, by the service that prints it.
const FAUX_PASSES: &[&str] = &[
    "relay: testprog: PASS relay: early wl add answered early-0",
    "relay: testprog: PASS relay: the server guest's listener context connected",
    "relay: testprog: PASS relay: the client guest connected to svc",
    "relay: testprog: PASS relay: wl add on the server VMM answered wl-conn-0",
    "server-vm: server: testprog: PASS server: listener bound on \"listen\"",
    "server-vm: server: testprog: PASS server: accepted wl-conn-0",
    "server-vm: server: testprog: PASS server: got ping and the client's shared memory",
    "client-vm: client: testprog: PASS client: connected to \"svc\"",
    "client-vm: client: testprog: PASS client: got pong and the server's shared memory",
    "server-vm: server: testprog: PASS wl-faux server: data and shared memory both ways",
    "client-vm: client: testprog: PASS wl-faux client: data and shared memory both ways",
    "relay: testprog: PASS wl-faux relay: relayed 1 fd to the server and 1 to the client",
];

#[test]
fn faux_accept_two_l2_guests_talk_through_an_l1_relay_with_wl_add() {
    bulkhead_tests::retry_on_emulator_reset(
        "faux_accept_two_l2_guests_talk_through_an_l1_relay_with_wl_add",
        faux_accept_two_l2_guests_talk_through_an_l1_relay_with_wl_add_once,
    );
}

fn faux_accept_two_l2_guests_talk_through_an_l1_relay_with_wl_add_once() {
    let mut h = Host::boot("wl-faux");
    // Both VMMs are jailed; the relay's sockets are socketpair ends init handed over.
    h.expect("relay: testprog: wl-faux-relay serving fd=");
    // Two nested guests boot side by side under software emulation: allow each step long.
    let step = std::time::Duration::from_secs(300);
    let finals = FAUX_PASSES.iter().filter(|p| p.contains("wl-faux "));
    let want_finals = finals.count();
    let mut finals_seen = 0;
    while finals_seen < want_finals {
        let line = h.expect_line_within("a test program's line", step, |l| {
            ["relay: ", "server-vm: ", "client-vm: "]
                .iter()
                .any(|p| l.starts_with(p))
                && l.contains("testprog: ")
        });
        assert!(!line.contains("FAIL:"), "{line}\n{}", h.context());
        if line.contains("testprog: PASS wl-faux ") {
            finals_seen += 1;
        }
    }
    h.expect_end(End::PowerOff);
    for want in FAUX_PASSES {
        assert!(h.saw(want), "missing {want:?}\n{}", h.context());
    }
    h.assert_never_saw("FAIL:");
    for (vm, uid, cgroup) in [("server-vm", 1030, "server"), ("client-vm", 1031, "client")] {
        assert!(
            h.saw(&format!("bulkhead-init: {vm} exited with status 0")),
            "{vm} did not exit cleanly\n{}",
            h.context()
        );
        let jailed = format!(
            "bulkhead-init: {vm} jailed: uid {uid} gid {uid}, CapEff 0x0 CapPrm 0x0 CapBnd 0x0 \
             CapAmb 0x0, NoNewPrivs 1, own mnt ipc uts net pid namespaces, cgroup /bulkhead/{cgroup}"
        );
        assert!(h.saw(&jailed), "{vm} ran unjailed\n{}", h.context());
    }
}
