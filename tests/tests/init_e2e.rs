//! End-to-end tests of PID 1: each boots the Debian cloud kernel under QEMU (TCG, `-cpu max`,
//! q35 + intel-iommu + edu) with a Bulkhead host image whose `/init` is bulkhead-init.

use bulkhead_tests::{uptime_ms, BootOptions, End, Host};

#[test]
fn basic_host_loads_kvm_binds_granted_devices_to_vfio_and_powers_off_cleanly() {
    let mut h = Host::boot("basic");
    h.expect_line("kvm-amd loaded", |l| {
        l.contains("bulkhead-init: loaded module") && l.contains("kvm_amd")
    });
    // edu has no reset method and its grant does not accept that: refused, left alone.
    h.expect(
        "bulkhead-init: not binding 0000:00:03.0 to vfio-pci (for edu-vm): it has no reset \
         method (sysfs reset_method is empty) and the policy requires one",
    );
    h.expect("bulkhead-init: bound 0000:01:00.0 to vfio-pci (group ");
    h.expect("bulkhead-init: ready");
    h.expect("bulkhead-init: all services ended");
    h.expect("bulkhead-init: powering off");
    h.expect_end(End::PowerOff);
    h.assert_never_saw("Kernel panic");
    // The two checks run concurrently: their lines come in either order.
    let line = |needle: &str| {
        h.lines()
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no line with {needle:?}\n{}", h.context()))
    };
    // Nested SVM: /dev/kvm answers the KVM API inside the L1 host.
    line("kvm-check: testprog: /dev/kvm api 12");
    let vfio = line("vfio-check: testprog: 0000:01:00.0 ");
    assert!(
        vfio.contains("driver=vfio-pci") && vfio.ends_with("present"),
        "the rng must be bound to vfio-pci with its /dev/vfio/<group> node: {vfio}"
    );
    h.assert_never_saw("bound 0000:00:03.0 to vfio-pci");
    line("bulkhead-init: kvm-check exited with status 0");
    line("bulkhead-init: vfio-check exited with status 0");
}

#[test]
fn crashing_service_is_restarted_with_growing_delays_then_given_up() {
    let mut h = Host::boot_with(
        "supervise",
        BootOptions {
            restarts_allowed: vec!["crashy".into()],
            ..Default::default()
        },
    );
    let mut starts = Vec::new();
    for _ in 0..4 {
        let l = h.expect("crashy: testprog: start uptime_ms=");
        starts.push(uptime_ms(&l).unwrap_or_else(|| panic!("no uptime in {l:?}")));
        h.expect("bulkhead-init: crashy exited with status 3");
    }
    h.expect("bulkhead-init: crashy failed: start limit reached (4 starts in ");
    h.expect("bulkhead-init: all services ended");
    h.expect_end(End::PowerOff);

    let restarts: Vec<&String> = h
        .lines()
        .iter()
        .filter(|l| l.contains("bulkhead-init: crashy restarting in "))
        .collect();
    let delays: Vec<&str> = restarts
        .iter()
        .filter_map(|l| l.split("restarting in ").nth(1))
        .collect();
    assert_eq!(delays, ["300 ms", "600 ms", "1200 ms"], "announced backoff");
    // Measured inside the guest: each gap is at least its delay and the gaps grow.
    let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps[0] >= 300 && gaps[1] >= 600 && gaps[2] >= 1200,
        "gaps {gaps:?}"
    );
    assert!(
        gaps[0] < gaps[1] && gaps[1] < gaps[2],
        "gaps must grow: {gaps:?}"
    );
    assert_eq!(
        h.lines()
            .iter()
            .filter(|l| l.contains("crashy: testprog: start"))
            .count(),
        4,
        "no start after the burst limit"
    );
}

#[test]
fn service_ignoring_sigterm_is_killed_after_its_timeout_at_poweroff() {
    let mut h = Host::boot("stop");
    h.expect("stubborn: testprog: ignoring SIGTERM");
    // `bulkhead-init status` over the control socket lists the running service.
    h.expect_line("status lists stubborn", |l| {
        l.starts_with("status: ") && l.contains("stubborn") && l.contains("running")
    });
    // `bulkhead-init poweroff` over the control socket starts the orderly shutdown.
    h.expect("stopper: testprog: running /bin/bulkhead-init");
    h.expect("bulkhead-init: stubborn did not stop after SIGTERM, sending SIGKILL");
    h.expect("bulkhead-init: stubborn killed by signal SIGKILL");
    h.expect("bulkhead-init: powering off");
    h.expect_end(End::PowerOff);
    h.assert_never_saw("bulkhead-init: stubborn restarting");
}

/// Also: a service's forged panic and power-off lines (the `forger` of the `idle` system)
/// are not taken for the host's own: the host is still up and then reboots.
#[test]
fn ctrl_alt_del_reboots_the_host() {
    let mut h = Host::boot("idle");
    h.expect("sleeper: testprog: sleeping");
    h.expect("bulkhead-init: forger exited with status 0");
    assert!(h.saw("forger: Kernel panic - not syncing: forged by a service"));
    assert!(h.saw("forger: reboot: Power down"));
    h.qmp().ctrl_alt_delete().unwrap_or_else(|e| panic!("{e}"));
    h.expect("bulkhead-init: rebooting");
    h.expect_end(End::Reboot);
}

#[test]
fn acpi_power_button_powers_the_host_off() {
    let mut h = Host::boot("idle");
    h.expect("sleeper: testprog: sleeping");
    h.qmp().power_button().unwrap_or_else(|e| panic!("{e}"));
    h.expect("bulkhead-init: powering off");
    h.expect_end(End::PowerOff);
}

#[test]
fn init_panic_powers_off_instead_of_a_kernel_panic() {
    let mut h = Host::boot_with(
        "idle",
        BootOptions {
            append: "bulkhead.test_panic=1".into(),
            ..Default::default()
        },
    );
    h.expect("bulkhead-init: panic:");
    h.expect_end(End::PowerOff);
    h.assert_never_saw("Kernel panic");
}
