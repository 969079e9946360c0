//! `bulkhead-vfio-check`: what the host sees of a passed-through PCI function, for tests and
//! for an operator checking a device after a VM used it.
//!
//! Prints the function's driver, IOMMU group (with its members) and reset methods. With
//! `--wait-released` it first waits until a VMM has had the device open (its sysfs `enable` went
//! to 1) and has let it go again (back to 0) — without ever opening the group itself,
//! so it cannot race a VMM for it. With `--read BAR:OFFSET` it reads one byte of a memory BAR
//! through sysfs `resource<BAR>` (an mmap; memory decoding is switched on for the read if it
//! was off) and with `--expect` fails unless that byte has the given value. `--release`, last,
//! is the explicit request that hands the function back to the host (nothing else ever does):
//! it is unbound from vfio-pci and the kernel may probe a host driver for it; it waits while a
//! VMM has its group open, up to `--wait-secs`. Exit status 0 when every check holds, 1 otherwise.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_vfio::{group_members, release, Bdf, SysfsRoot, VfioError};
use clap::Parser;

/// Command-line interface.
#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-vfio-check",
    about = "Show a PCI function's driver, IOMMU group and reset methods; read a BAR register"
)]
struct Cli {
    /// The function, e.g. 0000:01:00.0.
    bdf: Bdf,
    /// First wait until a VMM has opened the device and released it again.
    #[arg(long)]
    wait_released: bool,
    /// How long each wait may take, in seconds.
    #[arg(long, default_value_t = 900)]
    wait_secs: u64,
    /// Read one byte of memory BAR N at OFFSET (e.g. 4:0x14).
    #[arg(long, value_parser = parse_bar_offset)]
    read: Option<(u8, u64)>,
    /// The value the byte read must have (e.g. 0).
    #[arg(long, requires = "read", value_parser = parse_u8)]
    expect: Option<u8>,
    /// Fail unless the function is bound to vfio-pci.
    #[arg(long)]
    expect_vfio_pci: bool,
    /// After the checks, hand the function back to the host: unbind it from vfio-pci and let
    /// the kernel probe a host driver (waits, within --wait-secs, while a VMM has its group
    /// open).
    #[arg(long)]
    release: bool,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

fn parse_u8(s: &str) -> Result<u8, String> {
    u8::try_from(parse_u64(s)?).map_err(|e| format!("{s}: {e}"))
}

fn parse_bar_offset(s: &str) -> Result<(u8, u64), String> {
    let (bar, off) = s
        .split_once(':')
        .ok_or_else(|| format!("{s}: expected BAR:OFFSET"))?;
    let bar: u8 = bar.parse().map_err(|e| format!("{bar}: {e}"))?;
    if bar > 5 {
        return Err(format!("BAR {bar}: there are six, 0-5"));
    }
    Ok((bar, parse_u64(off)?))
}

fn say(s: &str) {
    println!("vfio-check: {s}");
}

/// The function's sysfs `enable` (1 while it is enabled: vfio-pci enables it while a VMM has
/// the device open, and disables it when the VMM lets go).
fn enable_count(dev: &Path) -> Result<u32, String> {
    let p = dev.join("enable");
    std::fs::read_to_string(&p)
        .map_err(|e| format!("{}: {e}", p.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn wait_for(
    dev: &Path,
    what: &str,
    limit: Duration,
    pred: impl Fn(u32) -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if pred(enable_count(dev)?) {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("gave up waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads one byte of BAR `bar` at `offset` through an mmap of sysfs `resource<bar>`.
fn read_bar_byte(dev: &Path, bar: u8, offset: u64) -> Result<u8, String> {
    // Memory decoding on (command register bit 1), or the BAR reads as all ones.
    let config = dev.join("config");
    let cf = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&config)
        .map_err(|e| format!("{}: {e}", config.display()))?;
    let mut cmd = [0u8; 2];
    cf.read_exact_at(&mut cmd, 4)
        .map_err(|e| format!("command register: {e}"))?;
    if u16::from_le_bytes(cmd) & 2 == 0 {
        let on = (u16::from_le_bytes(cmd) | 2).to_le_bytes();
        cf.write_all_at(&on, 4)
            .map_err(|e| format!("command register: {e}"))?;
        say("memory decoding was off; switched on for the read");
    }
    let path = dev.join(format!("resource{bar}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let size = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if offset >= size {
        return Err(format!(
            "offset {offset:#x} is outside BAR {bar} ({size:#x} bytes)"
        ));
    }
    let page = offset & !0xfff;
    let len = 0x1000usize;
    let off = libc::off_t::try_from(page).map_err(|e| e.to_string())?;
    // SAFETY: a new shared mapping of one page of the BAR, chosen by the kernel; it aliases
    // nothing and is unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let within = usize::try_from(offset - page).map_err(|e| e.to_string())?;
    // SAFETY: within < 0x1000 = the mapping's length; device memory is read once, volatile.
    let v = unsafe { p.cast::<u8>().add(within).read_volatile() };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(v)
}

fn run(cli: &Cli) -> Result<bool, String> {
    let root = SysfsRoot::host();
    let dev = root.function_path(cli.bdf);
    let bdf = cli.bdf;
    if cli.wait_released {
        let limit = Duration::from_secs(cli.wait_secs);
        wait_for(&dev, "a VMM to open the device", limit, |n| n > 0)?;
        say(&format!("{bdf} is in use (enable 1)"));
        wait_for(&dev, "the VMM to release the device", limit, |n| n == 0)?;
        say(&format!("{bdf} was released (enable 0)"));
    }
    let f = root.function(bdf).map_err(|e| e.to_string())?;
    let group = f
        .iommu_group
        .map(|g| g.to_string())
        .unwrap_or_else(|| "none".into());
    let members = match f.iommu_group {
        Some(g) => group_members(&root, g)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|m| format!("{}({})", m.name, m.driver.as_deref().unwrap_or("no driver")))
            .collect::<Vec<_>>()
            .join(" "),
        None => String::new(),
    };
    say(&format!(
        "{bdf} {:04x}:{:04x} driver={} group={group} [{members}] reset_method={}",
        f.vendor,
        f.device,
        f.driver.as_deref().unwrap_or("none"),
        if f.reset_methods.is_empty() {
            "none".to_string()
        } else {
            f.reset_methods.join(",")
        }
    ));
    let mut ok = true;
    if cli.expect_vfio_pci && !f.is_bound_to_vfio_pci() {
        say(&format!("{bdf} is not bound to vfio-pci"));
        ok = false;
    }
    if let Some((bar, offset)) = cli.read {
        let v = read_bar_byte(&dev, bar, offset)?;
        say(&format!("{bdf} BAR {bar} + {offset:#x} = {v:#04x}"));
        if let Some(want) = cli.expect {
            if v != want {
                say(&format!("expected {want:#04x}"));
                ok = false;
            }
        }
    }
    if cli.release {
        // A VMM that has let the device go may still hold its group for a moment (KVM's VFIO
        // device keeps a reference until the VMM exits): wait for it, within --wait-secs.
        let start = Instant::now();
        let r = loop {
            match release(&root, bdf) {
                Err(VfioError::DeviceInUse { .. })
                    if start.elapsed() < Duration::from_secs(cli.wait_secs) =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other.map_err(|e| format!("release {bdf}: {e}"))?,
            }
        };
        say(&format!(
            "{bdf} released to the host{}: driver={}",
            if r.was_bound { " from vfio-pci" } else { "" },
            r.new_driver.as_deref().unwrap_or("none")
        ));
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => {
            say("OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            say("FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            say(&format!("FAIL: {e}"));
            ExitCode::FAILURE
        }
    }
}
