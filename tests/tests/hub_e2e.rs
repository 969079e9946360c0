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
    let mut h = Host::boot("hub");
    h.expect("bulkhead-init: started hub pid");
    // L1's init, not a guest's (theirs are prefixed with the service name). Three nested
    // guests share two emulated CPUs: a generous safety net, not a timing assertion.
    h.expect_line_within(
        "every VM and the audit check report",
        Duration::from_secs(600),
        |l| l.contains("FAIL") || l.starts_with("bulkhead-init: all services ended"),
    );
    h.expect_end(End::PowerOff);
    let lines = h.lines().to_vec();
    let saw = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(!saw("FAIL"), "a part failed\n{}", h.context());
    for want in PASSES {
        assert!(saw(want), "no line {want:?}\n{}", h.context());
    }
    // The audit record of the refusal names the VM, the object and why: no connect grant.
    let audit = lines
        .iter()
        .find(|l| l.contains("audit: testprog: hub-audit: "))
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
    // The hub wrote it, as the unprivileged user init started it as.
    assert!(
        saw("audit: hub-audit: the audit log is owned by uid 900"),
        "{}",
        h.context()
    );
    for vm in ["provider-vm", "client-vm", "intruder-vm"] {
        let crashed = format!("bulkhead-init: {vm} exited with status 3");
        let n = lines.iter().filter(|l| l.contains(&crashed)).count();
        if n > 0 {
            eprintln!(
                "warning: {vm} was restarted {n} time(s) after a guest triple fault \
                 (known nested-emulation flake)"
            );
        }
        assert!(
            saw(&format!("bulkhead-init: {vm} exited with status 0")),
            "{vm} did not end cleanly\n{}",
            h.context()
        );
    }
}
