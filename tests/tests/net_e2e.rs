//! The net VM end to end, in one boot of `tests/systems/net` with two NICs on one closed
//! QEMU hub: net-vm owns one by VFIO and runs bulkhead-netd; app VMs have only a virtio-net
//! device whose backend is net-vm, reached through the hub; the other NIC is the peer's, a
//! host service in a network namespace of its own (`bulkhead-netpeer`). The verdicts come
//! from the emulated host: init's lines, the peer's (what reached the wire: pages served,
//! echo requests, frames by source MAC), the VMMs' own log lines and the hub's audit log
//! (printed by `policyctl` on the host). A guest's line is used only for what happens inside
//! that guest (its carrier, what its fetch read), matched by its `<vm>: <program>: ` prefix.
//! The flood is fault injection (`bulkhead-netprobe flood` in flood-vm).

use std::time::{Duration, Instant};

use bulkhead_tests::{BootOptions, End, Host};

fn index_of(lines: &[String], what: &str, pred: impl Fn(&str) -> bool, h: &Host) -> usize {
    lines
        .iter()
        .position(|l| pred(l))
        .unwrap_or_else(|| panic!("no line: {what}\n{}", h.context()))
}

/// The number before `word` in `line` (`… 12 spoofed …`).
fn number_before(line: &str, word: &str) -> Option<u64> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.trim_end_matches([',', ';']) == word)?;
    words.get(i.checked_sub(1)?)?.parse().ok()
}

#[test]
fn app_vms_reach_the_peer_only_through_net_vm_with_a_grant_and_survive_its_restart_and_a_flood_fault_injected(
) {
    bulkhead_tests::retry_on_emulator_reset(
        "app_vms_reach_the_peer_only_through_net_vm_with_a_grant_and_survive_its_restart_and_a_flood_fault_injected",
        app_vms_reach_the_peer_only_through_net_vm_with_a_grant_and_survive_its_restart_and_a_flood_fault_injected_once,
    );
}

fn app_vms_reach_the_peer_only_through_net_vm_with_a_grant_and_survive_its_restart_and_a_flood_fault_injected_once(
) {
    let t0 = Instant::now();
    let mut h = Host::boot_with(
        "net",
        BootOptions {
            net_hub: true,
            restarts_allowed: vec!["net-vm".into()],
            ..Default::default()
        },
    );
    h.expect("bulkhead-init: started hub pid");
    // The power-off: the peer's line, init's, or the emulated host kernel's own (printed by
    // the kernel, never dropped: init drops console lines when the console is busy).
    h.expect_line_within("the host's power-off", Duration::from_secs(2400), |l| {
        l.starts_with("peer: powering off")
            || l.starts_with("bulkhead-init: powering off")
            || bulkhead_rootfs::qemu::host_kernel_message(l).starts_with("reboot: Power down")
    });
    h.expect_end(End::PowerOff);
    eprintln!("the net system ran for {:.0} s", t0.elapsed().as_secs_f64());
    let lines = h.lines().to_vec();
    let _ = std::fs::create_dir_all(bulkhead_tests::workspace_path("target/bulkhead-tests/net"));
    let _ = std::fs::write(
        bulkhead_tests::workspace_path("target/bulkhead-tests/net/console.txt"),
        lines.join("\n"),
    );
    let saw = |p: &str| lines.iter().any(|l| l.starts_with(p));
    // Lines init dropped because the console was busy (its writer never blocks): named in
    // every failure about a missing line.
    let drops: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("console was busy") || l.contains("console lines were dropped"))
        .collect();
    let line = |p: &str| -> String {
        lines
            .iter()
            .find(|l| l.starts_with(p))
            .cloned()
            .unwrap_or_else(|| panic!("no line starting {p:?} (drops: {drops:?})\n{}", h.context()))
    };
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("peer: FAIL") || l.starts_with("peer: error")),
        "the peer's scenario failed\n{}",
        h.context()
    );

    // The NIC went to net-vm by VFIO (init bound it because the policy grants it); the
    // peer's NIC went into the peer's own namespace.
    assert!(
        lines.iter().any(|l| l.starts_with("bulkhead-init: ")
            && l.contains("bound 0000:02:00.0 to vfio-pci")
            && l.contains("for net-vm")),
        "init did not bind the NIC for net-vm\n{}",
        h.context()
    );
    assert!(
        lines.iter().any(|l| l.starts_with("peer: ")
            && l.contains("(0000:00:12.0, ")
            && l.ends_with("is 198.51.100.1/24 in a network namespace of its own")),
        "{}",
        h.context()
    );
    line("net-vm: netd: netd: providing net");

    // 1. app-vm fetched the page over TCP and pinged the peer: the peer served it and saw
    //    the echo requests; what app-vm read is the page the peer made up at boot.
    let page = line("peer: the page says: ");
    let page = page.trim_start_matches("peer: the page says: ").to_string();
    assert!(page.starts_with("bulkhead peer page "), "{page}");
    line("peer: served GET /page to 198.51.100.10 ");
    line("peer: echo request from 198.51.100.10 ");
    let echoes = line("peer: echo requests from 198.51.100.10: ");
    assert!(
        echoes
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            >= Some(1),
        "{echoes}"
    );
    line(&format!("app-vm: net: fetched: {page}"));

    // 2. nogrant-vm has the same device and no grant: nothing of it reached the wire, it
    //    never had a carrier, its VMM was refused, and the hub's audit log says why.
    for needle in [
        "peer: served GET /page to 198.51.100.12 ",
        "peer: echo request from 198.51.100.12 ",
        "peer: frames from 52:54:00:00:00:0c",
        "nogrant-vm: link: eth0 carrier 1",
    ] {
        assert!(!saw(needle), "{needle}\n{}", h.context());
    }
    // Its guest's own lines, checked after how its VMM ended: a VM that did not power off
    // cleanly (a triple fault under emulation, a VMM killed) says so here, not as a
    // missing guest line. A console line init or the guest's init dropped (a busy
    // console) is named in the failure too.
    let why_missing = || {
        let notes: Vec<&String> = lines
            .iter()
            .filter(|l| {
                l.contains("console was busy")
                    || (l.starts_with("bulkhead-init: nogrant-vm ")
                        && (l.contains(" exited ") || l.contains(" killed ")))
                    || l.starts_with("nogrant-vm: net: ")
            })
            .collect();
        format!("{notes:#?}\n{}", h.context())
    };
    assert!(
        saw("bulkhead-init: nogrant-vm exited with status 0"),
        "nogrant-vm did not power off cleanly: {}",
        why_missing()
    );
    for l in [
        "nogrant-vm: net: no carrier after 30 s",
        "nogrant-vm: net: fetch failed",
    ] {
        assert!(saw(l), "no line starting {l:?}: {}", why_missing());
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("nogrant-vm: ")
                && l.contains("virtio-net: no link to net@net-vm")),
        "nogrant-vm's VMM did not say it has no link\n{}",
        h.context()
    );
    // The peer prints the hub's denied records of every VM: the first of each VM and kind
    // verbatim, then a count per VM and kind.
    let audit: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("peer: #") && l.contains(" DENY nogrant-vm connect net@net-vm"))
        .collect();
    assert!(!audit.is_empty(), "no audit record\n{}", h.context());
    assert!(audit.iter().all(|l| l.contains("NoGrant")), "{audit:?}");
    let counts: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("peer: audit: "))
        .collect();
    assert!(
        counts
            .iter()
            .any(|l| l.starts_with("peer: audit: nogrant-vm NoGrant: ")),
        "{counts:?}\n{}",
        h.context()
    );
    assert!(
        counts
            .iter()
            .all(|l| !l.starts_with("peer: audit: nogrant-vm ")
                || l.starts_with("peer: audit: nogrant-vm NoGrant: ")),
        "nogrant-vm refused for another reason: {counts:?}"
    );
    // A granted VM is never refused by the policy (while net-vm restarts, a connect may
    // find no provider: that is not a policy refusal).
    assert!(
        !counts.iter().any(|l| (l.starts_with("peer: audit: app-vm ")
            || l.starts_with("peer: audit: flood-vm "))
            && (l.contains(" NoGrant: ") || l.contains(" DeniedByRule: "))),
        "a granted VM was refused: {counts:?}\n{}",
        h.context()
    );

    // 3. The flood (fault injection): flood-vm's frames reached the peer at flood rate, and
    //    a page was served to app-vm in the middle of it; netd dropped the forged ones.
    let flood_lines = lines
        .iter()
        .filter(|l| l.starts_with("peer: flood: ") && l.contains(" frames from 52:54:00:00:00:0b"))
        .count();
    assert!(flood_lines >= 1, "no flood seen\n{}", h.context());
    line("peer: served 198.51.100.10 during the flood: ");
    let sent = line("flood-vm: net: sent ");
    assert!(number_before(&sent, "frames").unwrap_or(0) > 0, "{sent}");
    let joined = line("net-vm: netd: netd: wl-conn-");
    let flood_conn = lines
        .iter()
        .filter(|l| {
            l.starts_with("net-vm: netd: netd: wl-conn-")
                && l.contains("(52:54:00:00:00:0b) joined")
        })
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .next()
        .unwrap_or_else(|| panic!("flood-vm never joined ({joined})\n{}", h.context()));
    let gone = line(&format!("net-vm: netd: netd: {flood_conn} gone"));
    assert!(
        number_before(&gone, "spoofed").unwrap_or(0) > 0,
        "netd dropped no forged frame: {gone}"
    );

    // 4. net-vm's VMM killed: init restarted it, app-vm's link went down (its VMM and its
    //    guest say so), came back, and a new fetch reached the peer.
    // What the kill causes is looked for from the peer's line before it ("flood-vm has
    // ended", 2 s before the kill): init kills for the peer (its control socket) and its own
    // lines, and app-vm's, can come before the peer's "killed" line (seen once: init's
    // "killed by signal" did).
    let ended = index_of(
        &lines,
        "flood-vm has ended",
        |l| l.starts_with("peer: flood-vm has ended"),
        &h,
    );
    index_of(
        &lines[ended..],
        "the kill",
        |l| l.starts_with("peer: killed net-vm (pid "),
        &h,
    );
    assert!(
        !lines[..ended]
            .iter()
            .any(|l| l.starts_with("bulkhead-init: net-vm killed by signal")),
        "net-vm killed before the peer killed it\n{}",
        h.context()
    );
    let after = &lines[ended..];
    let pos = |what: &str, pred: &dyn Fn(&str) -> bool| -> usize {
        after
            .iter()
            .position(|l| pred(l))
            .unwrap_or_else(|| panic!("after the kill, no line: {what}\n{}", h.context()))
    };
    pos("init saw net-vm killed", &|l| {
        l.starts_with("bulkhead-init: net-vm killed by signal") && l.contains("SIGKILL")
    });
    pos("init restarts net-vm", &|l| {
        l.starts_with("bulkhead-init: net-vm restarting in ")
    });
    let down_vmm = pos("app-vm's VMM: link down", &|l| {
        l.starts_with("app-vm: ") && l.contains("virtio-net: link down (net@net-vm")
    });
    let down_guest = pos("app-vm: carrier 0", &|l| {
        l.starts_with("app-vm: link: eth0 carrier 0")
    });
    let runs_again = pos("net-vm runs again", &|l| {
        l.starts_with("peer: net-vm runs again")
    });
    let up_vmm = runs_again
        + after[runs_again..]
            .iter()
            .position(|l| {
                l.starts_with("app-vm: ") && l.contains("virtio-net: link up (net@net-vm")
            })
            .unwrap_or_else(|| panic!("no link up after net-vm's restart\n{}", h.context()));
    let up_guest = pos("app-vm: carrier 1", &|l| {
        l.starts_with("app-vm: link: eth0 carrier 1")
    });
    assert!(
        down_vmm < up_vmm && down_guest < up_guest,
        "{}",
        h.context()
    );
    let again = pos("a fetch after the restart", &|l| {
        l.starts_with("peer: served 198.51.100.10 after net-vm's restart")
    });
    assert!(runs_again < again && up_vmm < again, "{}", h.context());
    let providing_again = pos("netd provides net again", &|l| {
        l.starts_with("net-vm: netd: netd: providing net")
    });
    assert!(providing_again < again);
}
