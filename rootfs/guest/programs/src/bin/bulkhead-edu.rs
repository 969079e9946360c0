//! `bulkhead-edu`: a user-space driver for QEMU's `edu` device (1234:11e8) passed through to
//! this VM. It does what a driver does, through the guest kernel's standard interfaces:
//!
//! - finds the device under /sys/bus/pci/devices and enables it,
//! - binds it to `uio_pci_generic` (for its interrupt: a blocking read of /dev/uioN returns
//!   when the device raises INTx; the handler masks INTx in the command register and the
//!   driver unmasks it there),
//! - maps BAR0 (`resource0`) and checks the identification register and liveness,
//! - computes factorials through the register interface, polling the status register, then
//!   one with the completion interrupt over INTx and one over MSI (see `msi_factorial`),
//! - runs a DMA transfer from a locked page of its own memory into the device's buffer and back
//!   into another page (guest-physical addresses from /proc/self/pagemap: this VM has no IOMMU,
//!   so the device sees guest-physical addresses and the VMM maps IOVA = guest-physical).
//!
//! Prints `edu: ...` lines (e.g. `edu: 10! = 3628800`), then `edu: PASS` or `edu: FAIL: why`,
//! and exits 0 only on PASS.
//!
//! With `--serve SERVICE`, the driver VM then offers what the device computes to other VMs:
//! it provides SERVICE over virtio_wl (the listener context `listen:SERVICE`; the hub decides
//! who may connect), takes `--serve-count` connections through the faux accept, and answers
//! each request `N` (a decimal number, at most 12) with `N! = X`, computed by the device.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::libc;

const VENDOR: &str = "0x1234";
const DEVICE: &str = "0x11e8";
const BAR_SIZE: usize = 1 << 20;

// Registers (QEMU docs/specs/edu.rst).
const ID: usize = 0x00;
const LIVENESS: usize = 0x04;
const FACTORIAL: usize = 0x08;
const STATUS: usize = 0x20;
const IRQ_STATUS: usize = 0x24;
const IRQ_ACK: usize = 0x64;
const DMA_SRC: usize = 0x80;
const DMA_DST: usize = 0x88;
const DMA_COUNT: usize = 0x90;
const DMA_CMD: usize = 0x98;
const STATUS_BUSY: u32 = 0x01;
const STATUS_IRQ_ON_FACTORIAL: u32 = 0x80;
const DMA_START: u32 = 1;
const DMA_TO_RAM: u32 = 2;
/// Device address of edu's DMA buffer.
const EDU_BUFFER: u32 = 0x40000;
/// Bytes per transfer: below 4096 (QEMU 7.2's edu aborts on a transfer ending exactly at the
/// end of its buffer).
const DMA_LEN: usize = 2048;
/// edu decodes 28 address bits.
const DMA_LIMIT: u64 = 1 << 28;
const PAGE: usize = 4096;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Deadline for the interrupt, in milliseconds.
const IRQ_DEADLINE_MS: i32 = 10_000;
const POLLS: u32 = 10_000_000;
/// PCI capability ID of MSI.
const CAP_ID_MSI: u8 = 0x05;
/// The vector edu's MSI is sent to: 0xf5, a system vector Linux leaves unused ("was
/// UV_BAU_MESSAGE" in arch/x86/include/asm/irq_vectors.h, 6.1 to 6.12), so its arrival is
/// counted as a spurious interrupt.
const MSI_VECTOR: u32 = 0xf5;
/// MSI address for a fixed, physically addressed interrupt to the CPU with APIC ID 0.
const MSI_ADDRESS: u32 = 0xfee0_0000;

type Res<T> = Result<T, String>;

fn ensure(cond: bool, what: impl Into<String>) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

fn say(s: &str) {
    println!("edu: {s}");
    let _ = std::io::stdout().flush();
}

/// BAR0 mapped into this process.
struct Bar0 {
    base: *mut u8,
}

impl Bar0 {
    fn map(dev: &Path) -> Res<Self> {
        let path = dev.join("resource0");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: a new shared mapping of the BAR chosen by the kernel; it aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BAR_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        ensure(
            p != libc::MAP_FAILED,
            format!(
                "mmap {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ),
        )?;
        Ok(Self { base: p.cast() })
    }

    fn read(&self, reg: usize) -> u32 {
        debug_assert!(reg + 4 <= BAR_SIZE);
        // SAFETY: reg is one of the constant, aligned register offsets inside the 1 MiB
        // mapping; device memory is accessed only with volatile 32-bit operations.
        unsafe { self.base.add(reg).cast::<u32>().read_volatile() }
    }

    fn write(&self, reg: usize, v: u32) {
        debug_assert!(reg + 4 <= BAR_SIZE);
        // SAFETY: as in `read`.
        unsafe { self.base.add(reg).cast::<u32>().write_volatile(v) }
    }

    fn wait_clear(&self, reg: usize, mask: u32, what: &str) -> Res<()> {
        for _ in 0..POLLS {
            if self.read(reg) & mask == 0 {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        Err(format!("{what} never finished"))
    }
}

fn find_edu() -> Res<PathBuf> {
    let dir = Path::new("/sys/bus/pci/devices");
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let read = |n: &str| fs::read_to_string(p.join(n)).unwrap_or_default();
        if read("vendor").trim() == VENDOR && read("device").trim() == DEVICE {
            return Ok(p);
        }
    }
    Err("no edu device (1234:11e8) on the PCI bus".into())
}

fn factorial(n: u32) -> u32 {
    (1..=n).product()
}

/// Binds the device to uio_pci_generic and opens its /dev/uioN.
fn bind_uio(dev: &Path) -> Res<File> {
    let drv = Path::new("/sys/bus/pci/drivers/uio_pci_generic");
    ensure(
        drv.exists(),
        "uio_pci_generic is not loaded (add it to the guest's modules)",
    )?;
    let bound = fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if bound.as_deref() != Some("uio_pci_generic") {
        fs::write(drv.join("new_id"), "1234 11e8")
            .map_err(|e| format!("uio_pci_generic/new_id: {e}"))?;
    }
    let uio = fs::read_dir(dev.join("uio"))
        .map_err(|e| format!("no uio device after binding: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("uio"))
        .ok_or("no uio device after binding")?;
    let node = format!("/dev/{uio}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .map_err(|e| format!("{node}: {e}"))?;
    say(&format!("bound to uio_pci_generic ({node})"));
    Ok(f)
}

/// Waits (with a deadline) for one interrupt on the uio fd; returns uio's event count.
fn wait_irq(uio: &mut File) -> Res<u32> {
    let mut pfd = libc::pollfd {
        fd: uio.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, IRQ_DEADLINE_MS) };
    ensure(n == 1, "no interrupt within the deadline")?;
    let mut count = [0u8; 4];
    uio.read_exact(&mut count)
        .map_err(|e| format!("read uio: {e}"))?;
    Ok(u32::from_ne_bytes(count))
}

/// Sets and clears bits of the command register through the function's sysfs `config`.
fn update_command(dev: &Path, set: u16, clear: u16) -> Res<u16> {
    let path = dev.join("config");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cmd = [0u8; 2];
    f.read_exact_at(&mut cmd, 4)
        .map_err(|e| format!("read command register: {e}"))?;
    let v = (u16::from_le_bytes(cmd) | set) & !clear;
    f.write_all_at(&v.to_le_bytes(), 4)
        .map_err(|e| format!("write command register: {e}"))?;
    f.read_exact_at(&mut cmd, 4)
        .map_err(|e| format!("read command register: {e}"))?;
    Ok(u16::from_le_bytes(cmd))
}

/// The function's config space (the first 256 bytes; root may write it).
fn open_config(dev: &Path) -> Res<File> {
    let path = dev.join("config");
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The offset of capability `id` in config space, walking the list (bounded).
fn find_capability(cfg: &File, id: u8) -> Res<usize> {
    let mut b = [0u8; 1];
    cfg.read_exact_at(&mut b, 0x34)
        .map_err(|e| format!("capability pointer: {e}"))?;
    let mut at = usize::from(b[0] & !3);
    for _ in 0..48 {
        if !(0x40..0x100).contains(&at) {
            break;
        }
        let mut cap = [0u8; 2];
        cfg.read_exact_at(&mut cap, at as u64)
            .map_err(|e| format!("capability at {at:#x}: {e}"))?;
        if cap[0] == id {
            return Ok(at);
        }
        at = usize::from(cap[1] & !3);
    }
    Err(format!("no capability {id:#04x}"))
}

/// The kernel's count of spurious interrupts: the `SPU:` row of /proc/interrupts, summed
/// over the CPUs. An interrupt on a vector no handler owns counts there.
fn spurious_count() -> Res<u64> {
    let text =
        fs::read_to_string("/proc/interrupts").map_err(|e| format!("/proc/interrupts: {e}"))?;
    parse_spurious(&text).ok_or_else(|| "no SPU row in /proc/interrupts".to_string())
}

/// The `SPU:` row's per-CPU counts, summed (the row ends with its description).
fn parse_spurious(proc_interrupts: &str) -> Option<u64> {
    let row = proc_interrupts
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("SPU:"))?;
    let mut sum = 0u64;
    let mut counts = 0;
    for word in row.split_whitespace() {
        match word.parse::<u64>() {
            Ok(n) => {
                sum = sum.saturating_add(n);
                counts += 1;
            }
            Err(_) => break,
        }
    }
    (counts > 0).then_some(sum)
}

/// Waits (deadline-bounded) until the spurious-interrupt count exceeds `before`.
fn wait_spurious_above(before: u64) -> Res<u64> {
    let mut waited_ms = 0;
    loop {
        let now = spurious_count()?;
        if now > before {
            return Ok(now);
        }
        ensure(
            waited_ms < IRQ_DEADLINE_MS,
            format!(
                "the spurious-interrupt count stayed at {now} (no MSI arrived) within the deadline"
            ),
        )?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        waited_ms += 20;
    }
}

/// One factorial with its completion interrupt sent as MSI.
///
/// A user-space driver has no MSI handler in the kernel (uio_pci_generic only does INTx), so
/// this programs edu's MSI capability itself with a message for vector `MSI_VECTOR` on CPU 0.
/// That vector is one of the x86 system vectors Linux leaves unused, whose arrival the kernel
/// counts as a spurious interrupt (the `SPU:` row of /proc/interrupts) and otherwise ignores;
/// nothing else in this guest sends it. The count going up while the device reports its
/// interrupt is the proof that the interrupt came as MSI, with exactly the address and data
/// programmed here, through the VMM's MSI route: a counter, not a log message's wording.
fn msi_factorial(dev: &Path, bar: &Bar0) -> Res<()> {
    let cfg = open_config(dev)?;
    let cap = find_capability(&cfg, CAP_ID_MSI)?;
    let w = |at: usize, v: &[u8]| {
        cfg.write_all_at(v, (cap + at) as u64)
            .map_err(|e| format!("MSI capability +{at:#x}: {e}"))
    };
    let mut ctl = [0u8; 2];
    cfg.read_exact_at(&mut ctl, (cap + 2) as u64)
        .map_err(|e| format!("MSI control: {e}"))?;
    let control = u16::from_le_bytes(ctl);
    let is_64bit = control & (1 << 7) != 0;
    w(4, &MSI_ADDRESS.to_le_bytes())?;
    let data_at = if is_64bit {
        w(8, &0u32.to_le_bytes())?;
        12
    } else {
        8
    };
    w(data_at, &(MSI_VECTOR as u16).to_le_bytes())?;
    // Enable, one vector (multiple-message enable 0).
    w(2, &((control & !0x70) | 1).to_le_bytes())?;
    say(&format!(
        "MSI enabled at capability {cap:#x}: address {MSI_ADDRESS:#x}, data {MSI_VECTOR:#x}"
    ));
    let before = spurious_count()?;
    bar.write(STATUS, STATUS_IRQ_ON_FACTORIAL);
    bar.write(FACTORIAL, 7);
    let counted = wait_spurious_above(before);
    let st = bar.read(IRQ_STATUS);
    bar.write(IRQ_ACK, st);
    bar.write(STATUS, 0);
    // MSI off again (the VMM gives INTx back to VFIO).
    w(2, &(control & !1).to_le_bytes())?;
    let after = counted?;
    ensure(st & 1 == 1, format!("interrupt status {st:#x} after MSI"))?;
    let got = bar.read(FACTORIAL);
    ensure(got == 5040, format!("7! with MSI = {got}"))?;
    say(&format!(
        "interrupt received (MSI, vector {MSI_VECTOR:#x}: spurious-interrupt count {before} -> {after}), 7! = {got}"
    ));
    Ok(())
}

/// Guest-physical address of the page at `addr` (locked, touched) from /proc/self/pagemap.
fn physical(addr: usize) -> Res<u64> {
    let mut f = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    f.seek(SeekFrom::Start((addr / PAGE * 8) as u64))
        .map_err(|e| format!("pagemap: {e}"))?;
    let mut e = [0u8; 8];
    f.read_exact(&mut e).map_err(|e| format!("pagemap: {e}"))?;
    let e = u64::from_ne_bytes(e);
    ensure(e >> 63 == 1, "page not present in pagemap")?;
    let pfn = e & ((1 << 55) - 1);
    ensure(pfn != 0, "pagemap hides PFNs (not root?)")?;
    Ok(pfn * PAGE as u64)
}

fn dma(bar: &Bar0) -> Res<()> {
    // SAFETY: a fresh private anonymous mapping of two pages; only accessed through raw
    // volatile operations below.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    ensure(buf != libc::MAP_FAILED, "mmap of the DMA pages")?;
    // SAFETY: locks the two pages just mapped (they stay at the same physical address).
    let rc = unsafe { libc::mlock(buf, 2 * PAGE) };
    ensure(
        rc == 0,
        format!("mlock: {}", std::io::Error::last_os_error()),
    )?;
    let src = buf.cast::<u8>();
    // SAFETY: PAGE is inside the two-page mapping.
    let dst = unsafe { src.add(PAGE) };
    for i in 0..PAGE {
        // SAFETY: i < PAGE: inside each page.
        unsafe {
            src.add(i).write_volatile((i * 7 + 3) as u8);
            dst.add(i).write_volatile(0);
        }
    }
    let (src_pa, dst_pa) = (physical(src as usize)?, physical(dst as usize)?);
    ensure(
        src_pa + PAGE as u64 <= DMA_LIMIT && dst_pa + PAGE as u64 <= DMA_LIMIT,
        format!("pages at {src_pa:#x}/{dst_pa:#x} are above edu's 28-bit DMA limit"),
    )?;
    // RAM -> edu buffer.
    bar.write(DMA_SRC, src_pa as u32);
    bar.write(DMA_DST, EDU_BUFFER);
    bar.write(DMA_COUNT, DMA_LEN as u32);
    bar.write(DMA_CMD, DMA_START);
    bar.wait_clear(DMA_CMD, DMA_START, "DMA to the device")?;
    // edu buffer -> the other page.
    bar.write(DMA_SRC, EDU_BUFFER);
    bar.write(DMA_DST, dst_pa as u32);
    bar.write(DMA_COUNT, DMA_LEN as u32);
    bar.write(DMA_CMD, DMA_START | DMA_TO_RAM);
    bar.wait_clear(DMA_CMD, DMA_START, "DMA to RAM")?;
    for i in 0..PAGE {
        // SAFETY: i < PAGE: inside each page.
        let (a, b) = unsafe { (src.add(i).read_volatile(), dst.add(i).read_volatile()) };
        let want = if i < DMA_LEN { a } else { 0 };
        ensure(
            b == want,
            format!("DMA mismatch at byte {i}: {b:#x}, expected {want:#x}"),
        )?;
    }
    say(&format!(
        "DMA {DMA_LEN} bytes RAM {src_pa:#x} -> edu -> RAM {dst_pa:#x} intact"
    ));
    Ok(())
}

/// Command line.
#[derive(clap::Parser)]
#[command(about = "User-space driver for QEMU's edu device, and a factorial service")]
struct Cli {
    /// After the checks, provide this virtio_wl service (through the hub).
    #[arg(long)]
    serve: Option<String>,
    /// Connections to serve before exiting.
    #[arg(long, default_value_t = 1)]
    serve_count: u32,
}

/// The largest n whose factorial edu's 32-bit register holds.
const MAX_N: u32 = 12;

/// Serves `count` connections of `service`: each request `N` gets `N! = X` from the device.
fn serve(bar: &Bar0, service: &str, count: u32) -> Res<()> {
    let wl = bulkhead_wl::Wl::open().map_err(|e| format!("open /dev/wl0: {e}"))?;
    let mut listener = bulkhead_wl::Listener::bind(&wl, &format!("listen:{service}"))
        .map_err(|e| format!("provide {service}: {e}"))?;
    say(&format!("serving {service} through the hub"));
    for _ in 0..count {
        let (conn, name) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let (data, _fds) = conn.recv().map_err(|e| format!("recv on {name}: {e}"))?;
        let asked = String::from_utf8_lossy(&data).trim().to_string();
        let reply = match asked.parse::<u32>() {
            Ok(n) if n <= MAX_N => {
                bar.write(STATUS, 0);
                bar.write(FACTORIAL, n);
                bar.wait_clear(STATUS, STATUS_BUSY, "factorial")?;
                format!("{n}! = {}", bar.read(FACTORIAL))
            }
            _ => format!("error: ask for a number from 0 to {MAX_N}"),
        };
        conn.send(reply.as_bytes(), &[])
            .map_err(|e| format!("send on {name}: {e}"))?;
        say(&format!(
            "{service}: {name} asked {asked:?}, answered {reply:?}"
        ));
    }
    Ok(())
}

fn run(cli: &Cli) -> Res<()> {
    let dev = find_edu()?;
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    say(&format!("found 1234:11e8 at {name}"));
    fs::write(dev.join("enable"), "1").map_err(|e| format!("enable: {e}"))?;
    let mut uio = bind_uio(&dev)?;
    let bar = Bar0::map(&dev)?;

    let id = bar.read(ID);
    ensure(id == 0x010000ed, format!("identification {id:#010x}"))?;
    say(&format!("identification {id:#010x}"));
    for x in [0x12345678u32, 0xdeadbeef] {
        bar.write(LIVENESS, x);
        let got = bar.read(LIVENESS);
        ensure(got == !x, format!("liveness {x:#x} -> {got:#x}"))?;
        say(&format!("liveness {x:#010x} -> {got:#010x}"));
    }
    bar.write(STATUS, 0);
    for n in [0u32, 1, 5, 10, 12] {
        bar.write(FACTORIAL, n);
        bar.wait_clear(STATUS, STATUS_BUSY, "factorial")?;
        let got = bar.read(FACTORIAL);
        ensure(got == factorial(n), format!("{n}! = {got}"))?;
        say(&format!("{n}! = {got}"));
    }

    // The completion interrupt (INTx through the VMM's resampling irqfd).
    // uio_pci_generic masks INTx (command register bit 10) in its handler and has no
    // irqcontrol: the driver unmasks through config space.
    update_command(&dev, 0, COMMAND_INTX_DISABLE)?;
    bar.write(STATUS, STATUS_IRQ_ON_FACTORIAL);
    bar.write(FACTORIAL, 6);
    let count = wait_irq(&mut uio)?;
    let st = bar.read(IRQ_STATUS);
    ensure(st & 1 == 1, format!("interrupt status {st:#x}"))?;
    bar.write(IRQ_ACK, st);
    update_command(&dev, 0, COMMAND_INTX_DISABLE)?;
    let got = bar.read(FACTORIAL);
    ensure(got == 720, format!("6! with interrupt = {got}"))?;
    say(&format!(
        "interrupt received (INTx, uio count {count}), 6! = {got}"
    ));
    bar.write(STATUS, 0);

    // Bus mastering: the device sends MSI messages and does DMA only with it on.
    let cmd = update_command(&dev, COMMAND_BUS_MASTER, 0)?;
    ensure(cmd & COMMAND_BUS_MASTER != 0, "bus mastering did not stick")?;
    msi_factorial(&dev, &bar)?;
    dma(&bar)?;
    say("PASS");
    match &cli.serve {
        Some(service) => serve(&bar, service, cli.serve_count),
        None => Ok(()),
    }
}

fn main() -> std::process::ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    match run(&cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("FAIL: {e}"));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spurious_count_is_the_spu_row_summed_over_cpus() {
        let two_cpus = "           CPU0       CPU1\n  0:         33          0   IO-APIC   2-edge      timer\n\
                        NMI:          0          0   Non-maskable interrupts\n\
                        SPU:          1          2   Spurious interrupts\n\
                        ERR:          0\n";
        assert_eq!(parse_spurious(two_cpus), Some(3));
        assert_eq!(
            parse_spurious("SPU:          0   Spurious interrupts\n"),
            Some(0)
        );
        assert_eq!(parse_spurious("NMI: 0 0\n"), None);
        assert_eq!(parse_spurious("SPU: Spurious interrupts\n"), None);
    }
}
