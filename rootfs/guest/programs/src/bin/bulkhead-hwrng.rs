//! `bulkhead-hwrng`: checks, inside a VM, that a passed-through virtio-rng works under the
//! guest kernel's own drivers (virtio_pci + virtio_rng) with MSI-X.
//!
//! - waits (deadline-bounded) for a virtio entropy device and `/dev/hwrng`;
//! - names the PCI function behind it and its virtio status (`0xf`: the driver is running);
//! - reads bytes from `/dev/hwrng` (they come from the L1 host's virtio-rng, through the
//!   device's DMA into this VM's memory);
//! - checks the function's interrupts: every one MSI-X (`msi_irqs/<irq>` in sysfs), and the
//!   request queue's must have fired (`/proc/interrupts`).
//!
//! Prints `hwrng: ...` lines, then `hwrng: PASS` or `hwrng: FAIL: why`; exits 0 only on PASS.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;
use std::path::PathBuf;
use std::time::Duration;

type Res<T> = Result<T, String>;

/// virtio device ID of an entropy source.
const VIRTIO_ID_RNG: &str = "0x0004";
const BYTES: usize = 64;
const DEADLINE_MS: u64 = 20_000;

fn say(s: &str) {
    println!("hwrng: {s}");
    let _ = std::io::stdout().flush();
}

fn ensure(cond: bool, what: impl Into<String>) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// The virtio device directory of the entropy device, e.g. /sys/bus/virtio/devices/virtio0.
fn find_rng() -> Option<PathBuf> {
    let entries = fs::read_dir("/sys/bus/virtio/devices").ok()?;
    entries.flatten().map(|e| e.path()).find(|p| {
        fs::read_to_string(p.join("device"))
            .map(|d| d.trim() == VIRTIO_ID_RNG)
            .unwrap_or(false)
    })
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Res<T> {
    let mut waited = 0;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        ensure(
            waited < DEADLINE_MS,
            format!("no {what} within the deadline"),
        )?;
        std::thread::sleep(Duration::from_millis(100));
        waited += 100;
    }
}

fn run() -> Res<()> {
    let virtio = wait_for("virtio entropy device", find_rng)?;
    let name = virtio
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The parent of the virtio device is its PCI function.
    let pci_dir = fs::canonicalize(&virtio)
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .ok_or_else(|| format!("{name}: no PCI parent"))?;
    let pci = pci_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    wait_for("driver on the virtio device", || {
        fs::read_link(virtio.join("driver")).ok()
    })?;
    let status = fs::read_to_string(virtio.join("status"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    say(&format!("{name} at PCI {pci}, virtio status {status}"));
    let current = wait_for("/dev/hwrng source", || {
        fs::read_to_string("/sys/class/misc/hw_random/rng_current")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "none")
    })?;
    // Non-blocking reads under a deadline: a device that never answers fails the check
    // instead of hanging it.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/hwrng")
        .map_err(|e| format!("/dev/hwrng: {e}"))?;
    let mut buf = [0u8; BYTES];
    let mut got = 0;
    let mut waited = 0;
    while got < BYTES {
        match f.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) | Err(_) if waited < DEADLINE_MS => {
                std::thread::sleep(Duration::from_millis(100));
                waited += 100;
            }
            Ok(n) if n > 0 => got += n,
            Ok(_) => {
                return Err(format!(
                    "only {got} bytes from /dev/hwrng within the deadline"
                ))
            }
            Err(e) => return Err(format!("reading /dev/hwrng: {e}")),
        }
    }
    ensure(buf.iter().any(|b| *b != 0), "/dev/hwrng gave only zeros")?;
    let hex: String = buf.iter().take(16).map(|b| format!("{b:02x}")).collect();
    say(&format!(
        "read {BYTES} bytes from /dev/hwrng ({current}): {hex}..."
    ));

    // The function's interrupts: `msi_irqs/<irq>` says "msix" or "msi" for each (what
    // /proc/interrupts calls the chip differs between kernel versions).
    let msi_dir = pci_dir.join("msi_irqs");
    let mut irqs = Vec::new();
    for e in fs::read_dir(&msi_dir)
        .map_err(|e| format!("{}: {e} (no MSI/MSI-X in use)", msi_dir.display()))?
        .flatten()
    {
        let irq = e.file_name().to_string_lossy().into_owned();
        let mode = fs::read_to_string(e.path()).unwrap_or_default();
        ensure(
            mode.trim() == "msix",
            format!("{pci} interrupt {irq} is {}, not MSI-X", mode.trim()),
        )?;
        irqs.push(irq);
    }
    ensure(!irqs.is_empty(), format!("{pci} has no MSI-X interrupts"))?;
    let interrupts =
        fs::read_to_string("/proc/interrupts").map_err(|e| format!("/proc/interrupts: {e}"))?;
    let mut fired = 0u64;
    for line in interrupts.lines() {
        let Some((irq, rest)) = line.trim_start().split_once(':') else {
            continue;
        };
        if !irqs.iter().any(|i| i == irq) {
            continue;
        }
        say(&format!(
            "/proc/interrupts: {irq}: {} (msix)",
            rest.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
        if !line.contains("-config") {
            fired += rest
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    ensure(fired > 0, format!("{name}'s queue interrupt never fired"))?;
    say(&format!(
        "{} MSI-X vectors; the request queue's fired {fired} times",
        irqs.len()
    ));
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => {
            say("PASS");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("FAIL: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}
