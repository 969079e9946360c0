//! The whole boot path through the real `bulkhead-vmm` binary on this machine's /dev/kvm, with
//! a hand-made bzImage: a valid setup header and, at the 64-bit entry point, a few
//! instructions that print bytes of the zero page, the command line and the initramfs on COM1
//! and then power off through the ACPI PM register. Every file and /dev/kvm are passed as
//! pre-opened fds, as init does.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;

/// A bzImage: 2 setup sectors' worth of header, then the "kernel" (entry at +0x200).
fn fake_bzimage(code64: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects: 1 (+ the boot sector)
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23c].copy_from_slice(&0x800u32.to_le_bytes()); // cmdline_size
    let mut kernel = vec![0xf4u8; 0x200]; // hlt padding up to startup_64
    kernel.extend_from_slice(code64);
    img.extend_from_slice(&kernel);
    img
}

/// 64-bit code: prints zero page bytes 0x202/0x203 ("Hd" of "HdrS"), the first byte of the
/// command line and of the initramfs, then writes S5 to the PM register.
fn probe_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0x8a, 0x86, 0x02, 0x02, 0, 0, 0xee]); // mov al,[rsi+0x202]; out
    c.extend_from_slice(&[0x8a, 0x86, 0x03, 0x02, 0, 0, 0xee]); // mov al,[rsi+0x203]; out
    c.extend_from_slice(&[0x8b, 0x9e, 0x28, 0x02, 0, 0]); // mov ebx,[rsi+0x228] cmd_line_ptr
    c.extend_from_slice(&[0x8a, 0x03, 0xee]); // mov al,[rbx]; out
    c.extend_from_slice(&[0x8b, 0x9e, 0x18, 0x02, 0, 0]); // mov ebx,[rsi+0x218] ramdisk_image
    c.extend_from_slice(&[0x8a, 0x03, 0xee]); // mov al,[rbx]; out
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]); // S5 to port 0x600
    c.push(0xf4);
    c
}

fn inheritable(f: &File) -> i32 {
    let fd = f.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns, so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    fd
}

#[test]
fn fake_bzimage_boots_in_long_mode_from_preopened_fds() {
    let dir = tempfile::tempdir().unwrap();
    let kernel_path = dir.path().join("bzImage");
    std::fs::write(&kernel_path, fake_bzimage(&probe_code())).unwrap();
    let initrd_path = dir.path().join("initrd");
    std::fs::write(&initrd_path, b"Q-initramfs").unwrap();
    let serial_path = dir.path().join("serial");

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap();
    let kernel = File::open(&kernel_path).unwrap();
    let initrd = File::open(&initrd_path).unwrap();
    let mut serial = File::create(&serial_path).unwrap();
    serial.flush().unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kvm-fd", &inheritable(&kvm).to_string()])
        .args(["--kernel-fd", &inheritable(&kernel).to_string()])
        .args(["--initramfs-fd", &inheritable(&initrd).to_string()])
        .args(["--serial-fd", &inheritable(&serial).to_string()])
        .args([
            "--cmdline",
            "Zed",
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--rng",
        ])
        .args(["--serial-input", "false"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        stderr.contains("bulkhead-vmm: INFO: VM ended: Poweroff"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&serial_path).unwrap(), b"HdZQ");
}

#[test]
fn bad_inputs_exit_1_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kernel", "/nonexistent/bzImage", "--serial", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent/bzImage"));

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kernel", junk.to_str().unwrap(), "--serial", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bzImage"));

    // An fd that is not open.
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kernel-fd", "987", "--serial", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("file descriptor 987"));

    // Usage errors are clap's status 2, and --help documents the exit statuses.
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("3  the guest rebooted"));
}

/// 64-bit code: prints `R` on COM1, then spins (it never looks at the power button).
fn spin_code() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend_from_slice(&[0xb0, b'R', 0xee]); // mov al, 'R'; out dx, al
    c.extend_from_slice(&[0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    c.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    c
}

/// How init stops a VM: SIGTERM presses the guest's ACPI power button (a guest that listens
/// powers off and the VMM ends with 0); a second SIGTERM stops it at once (status 4).
#[test]
fn sigterm_presses_the_power_button_and_a_second_one_stops_the_vm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, fake_bzimage(&spin_code())).unwrap();
    let serial = dir.path().join("serial");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .args(["--serial", serial.to_str().unwrap()])
        .args(["--serial-input", "false", "--memory", "64M"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        while !seen.iter().any(|l: &String| l.contains(needle)) {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => seen.push(l),
                Err(e) => panic!("no {needle:?} ({e}); stderr so far:\n{}", seen.join("\n")),
            }
        }
    };
    wait_for("vCPU(s) started");
    // The guest runs: its line reaches the serial file (a hang guard, not a timing
    // assertion), so the signals below reach a running guest.
    for _ in 0..60_000 {
        if std::fs::read(&serial).unwrap_or_default() == b"R\n" {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(std::fs::read(&serial).unwrap(), b"R\n", "the guest's line");
    let pid = child.id().to_string();
    let kill = |sig: &str| {
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success());
    };
    kill("-TERM");
    wait_for("SIGTERM: pressing the guest's power button");
    // This guest ignores the button: the VMM keeps running.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the VMM ended on the first SIGTERM"
    );
    kill("-TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4), "{status:?}");
    wait_for("SIGTERM again: stopping the VM now");
    assert_eq!(std::fs::read(&serial).unwrap(), b"R\n");
}
