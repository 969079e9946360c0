//! Operating a host end to end (`tests/systems/ops`): a hub and four VMs, and a service on
//! the host (`driver`, testprog `ops-drive`) that drives the real `bulkhead-ctl` through:
//! a non-root stop refused (the operators' group may only read), `log -f` showing vm-b's
//! new console lines, vm-a stopped, started and restarted while vm-b keeps running, the
//! hub killed (it restarts and every VM is restarted to register again), the hub killed
//! past its start limit (the VMs are held), `reset-failed hub` (all come back), and the
//! power-off, where vm-b, vm-c and vm-d ignore their power buttons and are killed at their
//! stop timeout: all at once. Verdicts come from init's own lines, and from the host's log
//! disk read back after the power-off (every service's log, rotated, and the hub's audit
//! log with the VMs' requests to each hub run).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bulkhead_tests::{BootOptions, End, Host};

const VMS: [&str; 4] = ["vm-a", "vm-b", "vm-c", "vm-d"];
/// vm-b, vm-c and vm-d's stop timeout (system.toml).
const STOP_TIMEOUT_MS: u64 = 6000;

/// An empty ext4 file system for the host's `/dev/vda` (its `[log] device`).
fn log_disk(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("log.ext4");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "bulkhead-log"])
        .arg(&img)
        .status()
        .unwrap_or_else(|e| panic!("mkfs.ext4 (e2fsprogs, installed by provision): {e}"));
    assert!(st.success(), "mkfs.ext4 failed");
    img
}

/// A file of the ext4 image, read with debugfs (no mount needed); `None` if absent.
fn read_back(img: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .unwrap_or_else(|e| panic!("debugfs (e2fsprogs): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !err.contains("File not found")).then_some(text)
}

/// The position of the first line starting with `needle` after `from`.
fn pos_after(lines: &[String], from: usize, needle: &str) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| l.starts_with(needle))
        .map(|(i, _)| i)
}

#[test]
fn operate_vms_with_bulkhead_ctl_survive_the_hub_and_shut_down_in_parallel() {
    bulkhead_tests::retry_on_emulator_reset(
        "operate_vms_with_bulkhead_ctl_survive_the_hub_and_shut_down_in_parallel",
        operate_vms_with_bulkhead_ctl_survive_the_hub_and_shut_down_in_parallel_once,
    );
}

fn operate_vms_with_bulkhead_ctl_survive_the_hub_and_shut_down_in_parallel_once() {
    let scratch = tempfile_dir();
    let disk = log_disk(&scratch);
    // Kept when the test fails: the services' logs on it tell where a run got stuck
    // (`debugfs -R 'cat /driver.log' DISK`).
    eprintln!("the host's log disk: {}", disk.display());
    let mut h = Host::boot_with(
        "ops",
        BootOptions {
            disk: Some(disk.clone()),
            restarts_allowed: vec!["hub".into()],
            ..Default::default()
        },
    );
    h.expect("bulkhead-init: read-only control socket /run/bulkhead-read/init.sock for group 1500");
    h.expect("bulkhead-init: started hub pid");
    // Four nested guests on two emulated CPUs, booted four times each: a safety net only.
    h.expect_line_within("the driver's verdict", Duration::from_secs(2400), |l| {
        l.starts_with("driver: testprog: ops-drive PASS") || l.starts_with("driver: testprog: FAIL")
    });
    h.expect("bulkhead-init: shutdown started (poweroff)");
    h.expect_end(End::PowerOff);
    // No test program failed (the driver, or a guest's hub probe: `vm-a: probe: testprog:
    // FAIL`), and no jailed process was killed by its seccomp filter. Not a bare "FAIL":
    // init's own `THE HUB HAS FAILED` is expected here.
    h.assert_never_saw("testprog: FAIL");
    h.assert_never_saw("killed by seccomp");
    // Init's kmsg copy of its lines is not printed by the kernel as well: that copy came
    // out in the middle of init's own console line (`bulkhead-init: THE HUB HAS FAILE[
    // 63.862139] bulkhead-init: THE HUB HAS FAILED…`), and the line was not found.
    h.assert_never_saw("] bulkhead-init: ");
    let lines = h.lines().to_vec();
    let saw = |needle: &str| lines.iter().any(|l| l.starts_with(needle));
    let need = |needle: &str| {
        assert!(saw(needle), "no line starting {needle:?}\n{}", h.context());
    };

    // Non-root: refused by init's socket; the group's socket is read-only.
    need("driver: ops: step non-root: stop refused: bulkhead-ctl: permission denied");
    need("driver: ops: step non-root: ls through the group's socket works, stop is refused");
    // log -f: three new lines of vm-b's console.
    need("driver: ops: step log-follow: new vm-b lines after tick ");
    // stop / start / restart of vm-a; its guest powered off on the power button.
    need("bulkhead-init: control socket: stop vm-a requested");
    need("bulkhead-init: vm-a exited with status 0");
    need("bulkhead-init: control socket: start vm-a requested");
    need("bulkhead-init: control socket: restart vm-a requested");
    need("bulkhead-init: vm-a stopped; starting it again");
    need("driver: ops: step beside: vm-b kept running (same pid)");

    // The hub killed: restarted, and every VM restarted to register with the new hub.
    let kill1 = pos_after(&lines, 0, "bulkhead-init: hub killed by signal SIGKILL")
        .unwrap_or_else(|| panic!("the hub was not killed\n{}", h.context()));
    for vm in VMS {
        let at = pos_after(
            &lines,
            kill1,
            &format!("bulkhead-init: restarting {vm}: the hub restarted"),
        );
        assert!(
            at.is_some(),
            "{vm} was not restarted after the hub\n{}",
            h.context()
        );
    }
    need("driver: ops: step hub-restart: the hub and every VM run again, each VM restarted");
    // Killed again: past its start limit; every VM held, then back with the hub.
    let kill2 = pos_after(
        &lines,
        kill1 + 1,
        "bulkhead-init: hub killed by signal SIGKILL",
    )
    .unwrap_or_else(|| panic!("the hub was not killed twice\n{}", h.context()));
    let failed = pos_after(
        &lines,
        kill2,
        "bulkhead-init: hub failed: start limit reached",
    )
    .unwrap_or_else(|| panic!("the hub did not fail\n{}", h.context()));
    need("bulkhead-init: THE HUB HAS FAILED");
    for vm in VMS {
        assert!(
            pos_after(
                &lines,
                failed,
                &format!("bulkhead-init: {vm} stopped; held until the hub runs again")
            )
            .is_some(),
            "{vm} not held\n{}",
            h.context()
        );
        assert!(
            pos_after(
                &lines,
                failed,
                &format!("bulkhead-init: starting {vm}: the hub runs again")
            )
            .is_some(),
            "{vm} not started again with the hub\n{}",
            h.context()
        );
    }
    need("bulkhead-init: control socket: reset-failed hub requested");

    // The power-off: vm-b, vm-c and vm-d each needed their whole stop timeout, all at once.
    let down = pos_after(&lines, 0, "bulkhead-init: shutdown started (poweroff)").unwrap();
    for vm in ["vm-b", "vm-c", "vm-d"] {
        assert!(
            pos_after(
                &lines,
                down,
                &format!("bulkhead-init: {vm} did not stop after SIGTERM, sending SIGKILL")
            )
            .is_some(),
            "{vm} was not killed at its stop timeout\n{}",
            h.context()
        );
    }
    let stopped = lines
        .iter()
        .skip(down)
        .find(|l| l.starts_with("bulkhead-init: stopped ") && l.contains(" services in "))
        .unwrap_or_else(|| panic!("no stop time\n{}", h.context()));
    let ms: u64 = stopped
        .split(" services in ")
        .nth(1)
        .and_then(|r| r.strip_suffix(" ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stopped}"));
    // Measured by the emulated host's init: at least one stop timeout (the three were
    // killed at it), and well under two (one after another would take three).
    assert!(
        (STOP_TIMEOUT_MS..2 * STOP_TIMEOUT_MS).contains(&ms),
        "stopping the services took {ms} ms; one stop timeout is {STOP_TIMEOUT_MS} ms\n{}",
        h.context()
    );

    // The log disk: every service's log, rotated by size, and the audit log.
    let vm_b = read_back(&disk, "/vm-b.log").unwrap_or_else(|| panic!("no vm-b.log on the disk"));
    assert!(vm_b.contains("tick "), "{vm_b}");
    assert!(
        read_back(&disk, "/vm-b.log.1").is_some(),
        "vm-b.log was never rotated"
    );
    assert!(
        read_back(&disk, "/vm-b.log.3").is_none(),
        "more rotated files than kept"
    );
    let all_b = format!(
        "{}{vm_b}",
        read_back(&disk, "/vm-b.log.2").unwrap_or_default()
    );
    assert!(
        all_b.lines().all(|l| l.contains("] ")),
        "lines without a time stamp"
    );
    let hub_log = read_back(&disk, "/hub.log").unwrap_or_default();
    assert!(
        hub_log.contains("[init] killed by signal SIGKILL"),
        "{hub_log}"
    );
    let audit = read_back(&disk, "/audit.jsonl").unwrap_or_else(|| panic!("no audit.jsonl"));
    for vm in VMS {
        let refused = audit
            .lines()
            .filter(|l| l.contains(&format!("\"src\":\"{vm}\"")) && l.contains("\"allowed\":false"))
            .count();
        // One per run of its VMM that reached a hub: before the hub was killed, after its
        // restart, and after reset-failed.
        assert!(
            refused >= 3,
            "{vm}: {refused} refused requests in the audit log, want one per hub run:\n{audit}"
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bulkhead-ops-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
