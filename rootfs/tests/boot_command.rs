//! `bulkhead-rootfs boot` as a user runs it: the exit status says how the host ended.
//! Each test boots the Debian cloud kernel under QEMU (needs `bulkhead-rootfs provision`).

use std::process::Command;
use std::sync::Mutex;

/// One boot at a time: two emulated hosts on two cores only slow each other down.
static SERIAL: Mutex<()> = Mutex::new(());

fn rootfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-rootfs"))
}

fn system(name: &str) -> String {
    format!("{}/../tests/systems/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `bulkhead-rootfs` with `args` (one boot at a time), asserts it exited 0 and returns
/// the console it printed.
fn boot_ok(args: &[&str]) -> String {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let out = rootfs().args(args).output().expect("run bulkhead-rootfs");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{console}\nstderr:\n{err}"
    );
    console
}

#[test]
fn boot_exits_0_after_a_clean_power_off() {
    let console = boot_ok(&["boot", "--system", &system("supervise"), "--timeout", "300"]);
    assert!(
        console.contains("bulkhead-init: ready"),
        "init's progress is shown:\n{console}"
    );
    assert!(console.contains("reboot: Power down"));
}

/// README's first command as it stands (`bulkhead-rootfs boot`, the example system): the edu
/// driver VM computes with its passed-through device and serves the result through the hub
/// to the hello VM, and the host powers off cleanly.
#[test]
fn readme_first_command_boots_the_example_system() {
    let console = boot_ok(&["boot", "--timeout", "900"]);
    for want in [
        "bulkhead-init: bound 0000:00:03.0 to vfio-pci",
        "bulkhead-init: started hub pid",
        "edu-vm: driver: edu: 10! = 3628800",
        "edu-vm: driver: edu: PASS",
        "hello-vm: hello: hello from inside a Bulkhead VM",
        "hello-vm: hello: factorial@edu-vm answered: 10! = 3628800",
        "bulkhead-init: edu-vm exited with status 0",
        "edu-vm: bulkhead-vmm: INFO: running as uid 1002 gid 1002, no capabilities",
        "hello-vm: bulkhead-vmm: INFO: running as uid 1001 gid 1001, no capabilities",
        "reboot: Power down",
    ] {
        assert!(console.contains(want), "no {want:?} in:\n{console}");
    }
    assert!(!console.contains("FAIL"), "{console}");
}

#[test]
fn boot_exits_2_on_a_kernel_panic() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // No init at that path: the kernel panics ("No working init found").
    let out = rootfs()
        .args([
            "boot",
            "--system",
            &system("supervise"),
            "--timeout",
            "300",
            "--append",
            "rdinit=/does-not-exist init=/does-not-exist",
        ])
        .output()
        .expect("run bulkhead-rootfs");
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "console:\n{console}");
    assert!(console.contains("Kernel panic"));
}
