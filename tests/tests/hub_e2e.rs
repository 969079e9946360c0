//! The hub end to end: init makes one channel per VM and starts `bulkhead-hub` before the
//! VMMs; three L2 guests reach each other only through virtio_wl names that lead to the hub.
//! A provider offers a service through the faux accept, a client connects and the two work
//! on one shared page (zero copy), a third guest without a grant is refused with the same
//! error as a name that does not exist, and the audit log on the host says which rule was
//! missing.

use std::time::Duration;

use bulkhead_tests::{End, Host};

/// The lines the system must print, by the service that prints them.
const PASSES: &[&str] = &[
    "provider-vm: role: hub-provider: providing squares",
    "provider-vm: role: hub-provider: accepted wl-conn-",
    "provider-vm: role: testprog: hub-provider PASS: squared 64 numbers in place",
    "client-vm: role: hub-client: connected to squares@provider",
    "client-vm: role: testprog: hub-client PASS: the provider squared 64 numbers in our own shared page",
    "intruder-vm: role: testprog: hub-refused PASS: squares@provider refused with the uniform error",
];

#[test]
fn provider_and_client_share_a_buffer_through_the_hub_and_an_ungranted_vm_is_refused() {
    bulkhead_tests::retry_on_emulator_reset(
        "provider_and_client_share_a_buffer_through_the_hub_and_an_ungranted_vm_is_refused",
        provider_and_client_share_a_buffer_through_the_hub_and_an_ungranted_vm_is_refused_once,
    );
}

fn provider_and_client_share_a_buffer_through_the_hub_and_an_ungranted_vm_is_refused_once() {
    let mut h = Host::boot("hub");
    h.expect("bulkhead-init: started hub pid");
    // L1's init, not a guest's (theirs are prefixed with the service name). Three nested
    // guests share two emulated CPUs: a generous safety net, not a timing assertion.
    h.expect_line_within(
        "every VM and the audit check to end",
        Duration::from_secs(900),
        |l| l.starts_with("bulkhead-init: all services ended"),
    );
    h.expect_end(End::PowerOff);
    let lines = h.lines().to_vec();
    let saw = |needle: &str| h.saw(needle);
    // No part may fail, whatever else happened (a VM restarted after the known
    // nested-emulation flake is reported by the harness; its peers' runs must still pass).
    h.assert_never_saw("FAIL");
    for want in PASSES {
        assert!(saw(want), "no line {want:?}\n{}", h.context());
    }
    // The audit record of the refusal names the VM, the object and why: no connect grant.
    let audit = lines
        .iter()
        .find(|l| l.starts_with("audit: testprog: hub-audit: "))
        .unwrap_or_else(|| panic!("no audit record\n{}", h.context()));
    for want in [
        "\"src\":\"intruder\"",
        "\"obj\":\"squares@provider\"",
        "\"allowed\":false",
        "\"verb\":\"connect\"",
        "NoGrant: no connect grant matches",
    ] {
        assert!(audit.contains(want), "{want} not in {audit}");
    }
    // Each VMM ran as its own unprivileged user, with /dev/kvm handed over by init.
    for (vm, uid) in [
        ("provider-vm", 1001),
        ("client-vm", 1002),
        ("intruder-vm", 1003),
    ] {
        let want = format!(
            "{vm}: bulkhead-vmm: INFO: running as uid {uid} gid {uid}, no capabilities, no_new_privs 1"
        );
        assert!(saw(&want), "no {want:?}\n{}", h.context());
    }
    // The hub wrote it, as the unprivileged user init started it as.
    assert!(
        saw("audit: hub-audit: the audit log is owned by uid 900"),
        "{}",
        h.context()
    );
    for vm in ["provider-vm", "client-vm", "intruder-vm"] {
        let prefix = format!("bulkhead-init: {vm} exited with ");
        let last = lines.iter().rev().find(|l| l.starts_with(&prefix));
        assert_eq!(
            last.map(|l| l.as_str()),
            Some(format!("{prefix}status 0").as_str()),
            "{vm} did not end cleanly\n{}",
            h.context()
        );
    }
}
