//! A manual end-to-end check of this crate on a real IOMMU: run as `/init` of a QEMU
//! guest (`-M q35 -device intel-iommu -device edu`, kernel `intel_iommu=on`) by
//! `edu_l1_check.sh`. It loads the VFIO modules, binds QEMU's `edu` device to
//! vfio-pci, opens it through a container and drives it the way a driver would:
//! identification, liveness, factorial, INTx and MSI interrupts, and DMA through
//! the IOMMU into memory mapped with `map_dma`. Prints `EDU-CHECK PASS` or
//! `EDU-CHECK FAIL: …` and powers off.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use bulkhead_vfio::device::{BAR0_REGION, CONFIG_REGION, INTX_IRQ, MSI_IRQ};
use bulkhead_vfio::{
    bind_to_vfio_pci, ensure_group_free, group_viable, host_critical_reason, open_container_fd,
    open_group_fd, release, Bdf, BindOptions, Container, Device, SysfsRoot, VfioError,
};
use vmm_sys_util::eventfd::EventFd;

const MODULES: &[&str] = &[
    "irqbypass",
    "vfio",
    "vfio_iommu_type1",
    "vfio_virqfd",
    "vfio-pci-core",
    "vfio-pci",
];

// edu registers (QEMU docs/specs/edu.rst).
const ID: u64 = 0x00;
const LIVENESS: u64 = 0x04;
const FACTORIAL: u64 = 0x08;
const STATUS: u64 = 0x20;
const IRQ_STATUS: u64 = 0x24;
const IRQ_ACK: u64 = 0x64;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
const EDU_BUFFER: u64 = 0x40000;
/// Bytes per DMA transfer. QEMU 7.2's edu aborts the whole VM (hw_error) on a
/// transfer that ends exactly at the end of its 4 KiB buffer, so stay below it.
const DMA_LEN: usize = 2048;

fn main() {
    let verdict = run();
    match &verdict {
        Ok(()) => println!("EDU-CHECK PASS"),
        Err(e) => println!("EDU-CHECK FAIL: {e}"),
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if std::process::id() == 1 {
        // SAFETY: powering off is what this init is for; it does not return.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
    }
    std::process::exit(i32::from(verdict.is_err()));
}

type Res<T> = Result<T, String>;

fn ensure(cond: bool, what: impl Into<String>) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

fn mount(src: &str, target: &str, fstype: &str) -> Res<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (src, tgt, ty) = (c(src)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    ensure(
        rc == 0,
        format!("mount {target}: {}", std::io::Error::last_os_error()),
    )
}

fn load_module(name: &str) -> Res<()> {
    let path = format!("/modules/{name}.ko");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    let params = c"";
    // SAFETY: finit_module reads the open module file and the empty parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    let err = std::io::Error::last_os_error();
    ensure(
        rc == 0 || err.raw_os_error() == Some(libc::EEXIST),
        format!("finit_module {name}: {err}"),
    )
}

fn r32(dev: &Device, off: u64) -> Res<u32> {
    let mut b = [0u8; 4];
    dev.read_region(BAR0_REGION, off, &mut b)
        .map_err(|e| e.to_string())?;
    Ok(u32::from_le_bytes(b))
}

fn w32(dev: &Device, off: u64, v: u32) -> Res<()> {
    dev.write_region(BAR0_REGION, off, &v.to_le_bytes())
        .map_err(|e| e.to_string())
}

fn w64(dev: &Device, off: u64, v: u64) -> Res<()> {
    dev.write_region(BAR0_REGION, off, &v.to_le_bytes())
        .map_err(|e| e.to_string())
}

/// Waits for an eventfd with a deadline; returns its counter.
fn wait_event(efd: &EventFd, what: &str) -> Res<u64> {
    let mut pfd = libc::pollfd {
        fd: efd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    ensure(n == 1, format!("no {what} interrupt within the deadline"))?;
    efd.read().map_err(|e| e.to_string())
}

fn poll_until_clear(dev: &Device, off: u64, mask: u32, what: &str) -> Res<()> {
    for _ in 0..1_000_000 {
        if r32(dev, off)? & mask == 0 {
            return Ok(());
        }
        std::hint::spin_loop();
    }
    Err(format!("{what} never finished"))
}

fn factorial(n: u32) -> u32 {
    (1..=n).product()
}

fn run() -> Res<()> {
    if std::process::id() == 1 {
        mount("proc", "/proc", "proc")?;
        mount("sysfs", "/sys", "sysfs")?;
        mount("devtmpfs", "/dev", "devtmpfs")?;
        for m in MODULES {
            load_module(m)?;
        }
    }
    let root = SysfsRoot::host();
    println!("iommu: {}", root.has_iommu().map_err(|e| e.to_string())?);
    let mut edu: Option<Bdf> = None;
    for f in root.functions().map_err(|e| e.to_string())? {
        let critical = host_critical_reason(&root, &f, false).map_err(|e| e.to_string())?;
        println!(
            "{} {:04x}:{:04x} class {:06x} driver {:?} group {:?} reset {:?} critical {:?}",
            f.bdf, f.vendor, f.device, f.class, f.driver, f.iommu_group, f.reset_methods, critical
        );
        if (f.vendor, f.device) == (0x1234, 0x11e8) {
            edu = Some(f.bdf);
        }
    }
    let bdf = edu.ok_or("no edu device (1234:11e8) on the bus")?;

    // The host bridge is refused, with nothing written.
    let host_bridge: Bdf = "0000:00:00.0"
        .parse()
        .map_err(|e: VfioError| e.to_string())?;
    match bind_to_vfio_pci(
        &root,
        host_bridge,
        BindOptions {
            force: true,
            ..Default::default()
        },
    ) {
        Err(VfioError::HostCritical { reason, .. }) => println!("host bridge refused: {reason}"),
        other => return Err(format!("host bridge not refused: {other:?}")),
    }

    let report = bind_to_vfio_pci(&root, bdf, BindOptions::default()).map_err(|e| e.to_string())?;
    println!("bind: {report:?}");
    ensure(report.changed, "first bind changed nothing")?;
    let again = bind_to_vfio_pci(&root, bdf, BindOptions::default()).map_err(|e| e.to_string())?;
    ensure(!again.changed, "second bind was not idempotent")?;
    group_viable(&root, report.group).map_err(|e| e.to_string())?;

    let mut container = Container::open(&root).map_err(|e| e.to_string())?;
    let dev = container
        .attach_device(&root, bdf)
        .map_err(|e| e.to_string())?;
    println!("regions: {:?}", dev.regions());
    println!(
        "irqs: intx {:?} msi {:?}; can_reset {}",
        dev.irq(INTX_IRQ),
        dev.irq(MSI_IRQ),
        dev.can_reset()
    );

    // A second opener of the group is refused: in use.
    match ensure_group_free(&root, report.group) {
        Err(VfioError::DeviceInUse { what, detail }) => {
            println!("second open refused: {what}: {detail}")
        }
        other => return Err(format!("second open of the group not refused: {other:?}")),
    }
    let mut second = Container::open(&root).map_err(|e| e.to_string())?;
    match second.open_group(&root, report.group) {
        Err(VfioError::DeviceInUse { .. }) => {}
        other => return Err(format!("second container got the group: {other:?}")),
    }
    match release(&root, bdf) {
        Err(VfioError::DeviceInUse { .. }) => println!("release refused while open"),
        other => return Err(format!("release while open was not refused: {other:?}")),
    }

    // Registers through pread/pwrite.
    let id = r32(&dev, ID)?;
    ensure(id == 0x010000ed, format!("identification {id:#x}"))?;
    w32(&dev, LIVENESS, 0x12345678)?;
    let inv = r32(&dev, LIVENESS)?;
    ensure(inv == !0x12345678u32, format!("liveness {inv:#x}"))?;
    for n in [0u32, 1, 5, 10, 12] {
        w32(&dev, FACTORIAL, n)?;
        poll_until_clear(&dev, STATUS, 1, "factorial")?;
        let got = r32(&dev, FACTORIAL)?;
        ensure(got == factorial(n), format!("{n}! = {got}"))?;
        println!("edu: {n}! = {got}");
    }

    // The same registers through an mmap of BAR0.
    let bar0 = dev.region(BAR0_REGION).ok_or("no BAR0")?.clone();
    let (off, size) = *bar0.mmap_areas.first().ok_or("BAR0 not mappable")?;
    let map = dev
        .map_area(BAR0_REGION, off, size)
        .map_err(|e| e.to_string())?;
    // SAFETY: offset 0 of a mapping of at least one page; device memory read volatile.
    let mid = unsafe { std::ptr::read_volatile(map.host_addr().cast::<u32>()) };
    ensure(mid == 0x010000ed, format!("mmap'd identification {mid:#x}"))?;
    drop(map);

    // INTx: trigger + resample.
    let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    dev.enable_intx(&trigger, &resample)
        .map_err(|e| e.to_string())?;
    w32(&dev, STATUS, 0x80)?;
    w32(&dev, FACTORIAL, 6)?;
    wait_event(&trigger, "INTx")?;
    let st = r32(&dev, IRQ_STATUS)?;
    ensure(st & 1 == 1, format!("irq status {st:#x}"))?;
    w32(&dev, IRQ_ACK, st)?;
    resample.write(1).map_err(|e| e.to_string())?;
    ensure(r32(&dev, FACTORIAL)? == 720, "6! with INTx")?;
    println!("edu: INTx received, 6! = 720");
    dev.disable_irq(INTX_IRQ).map_err(|e| e.to_string())?;

    // MSI and DMA are memory writes by the device: enable bus mastering in the
    // command register first (a guest driver's pci_set_master).
    let mut cmd = [0u8; 2];
    dev.read_region(CONFIG_REGION, 4, &mut cmd)
        .map_err(|e| e.to_string())?;
    let cmd = u16::from_le_bytes(cmd) | 0x4;
    dev.write_region(CONFIG_REGION, 4, &cmd.to_le_bytes())
        .map_err(|e| e.to_string())?;

    // MSI.
    let msi = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
    dev.enable_msi(&[&msi]).map_err(|e| e.to_string())?;
    w32(&dev, STATUS, 0x80)?;
    w32(&dev, FACTORIAL, 7)?;
    wait_event(&msi, "MSI")?;
    let st = r32(&dev, IRQ_STATUS)?;
    w32(&dev, IRQ_ACK, st)?;
    ensure(r32(&dev, FACTORIAL)? == 5040, "7! with MSI")?;
    println!("edu: MSI received, 7! = 5040");
    dev.disable_irq(MSI_IRQ).map_err(|e| e.to_string())?;
    w32(&dev, STATUS, 0)?;

    // DMA through the IOMMU: two pages, page 0 → edu buffer → page 1.
    bulkhead_vfio::check_memlock(8192).map_err(|e| e.to_string())?;
    // SAFETY: a fresh anonymous private mapping; no Rust object aliases it.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    ensure(buf != libc::MAP_FAILED, "mmap of the DMA buffer")?;
    let buf = buf.cast::<u8>();
    for i in 0..DMA_LEN {
        // SAFETY: i < DMA_LEN lies in the first page of the 8 KiB mapping.
        unsafe { buf.add(i).write_volatile((i * 7 + 3) as u8) };
    }
    let iova = 0x10_0000u64;
    // SAFETY: buf stays mapped until after unmap_dma below and is only accessed
    // with volatile operations.
    unsafe { container.map_dma(iova, 8192, buf) }.map_err(|e| e.to_string())?;
    w64(&dev, DMA_SRC, iova)?;
    w64(&dev, DMA_DST, EDU_BUFFER)?;
    w64(&dev, DMA_COUNT, DMA_LEN as u64)?;
    w64(&dev, DMA_CMD, 1)?;
    poll_until_clear(&dev, DMA_CMD, 1, "DMA to the device")?;
    w64(&dev, DMA_SRC, EDU_BUFFER)?;
    w64(&dev, DMA_DST, iova + 4096)?;
    w64(&dev, DMA_COUNT, DMA_LEN as u64)?;
    w64(&dev, DMA_CMD, 1 | 2)?;
    poll_until_clear(&dev, DMA_CMD, 1, "DMA from the device")?;
    for i in 0..DMA_LEN {
        // SAFETY: 4096 + i < 8192 lies in the mapping.
        let got = unsafe { buf.add(4096 + i).read_volatile() };
        ensure(got == (i * 7 + 3) as u8, format!("DMA byte {i}: {got:#x}"))?;
    }
    container.unmap_dma(iova, 8192).map_err(|e| e.to_string())?;
    println!("edu: DMA round trip of {DMA_LEN} bytes intact");

    match dev.reset() {
        Ok(()) => println!("reset: ok"),
        Err(e) => println!("reset: {e}"),
    }
    drop(dev);
    drop(second);
    drop(container);

    // Closed again: the group is free, and the device is still on vfio-pci.
    ensure_group_free(&root, report.group).map_err(|e| e.to_string())?;
    let f = root.function(bdf).map_err(|e| e.to_string())?;
    ensure(f.is_bound_to_vfio_pci(), "edu left vfio-pci")?;
    ensure(
        Path::new(&format!("/dev/vfio/{}", report.group)).exists(),
        "group node vanished",
    )?;

    // The fd form: init opens the nodes and passes descriptors; the VMM adopts them.
    let container_fd = open_container_fd(&root).map_err(|e| e.to_string())?;
    let group_fd = open_group_fd(&root, report.group).map_err(|e| e.to_string())?;
    // While the VMM holds the group, init's second request for it is refused.
    match open_group_fd(&root, report.group) {
        Err(VfioError::DeviceInUse { .. }) => {}
        other => return Err(format!("group handed out twice: {other:?}")),
    }
    let mut adopted = Container::from_fd(container_fd).map_err(|e| e.to_string())?;
    adopted
        .adopt_group(report.group, group_fd)
        .map_err(|e| e.to_string())?;
    let dev = adopted.open_device(bdf).map_err(|e| e.to_string())?;
    ensure(
        r32(&dev, ID)? == 0x010000ed,
        "identification via adopted fds",
    )?;
    ensure(
        adopted.groups().len() == 1,
        "adopted container lists its group",
    )?;
    println!("fd form: container and group adopted, edu answers");
    drop(dev);
    drop(adopted);

    // Explicit release hands it back (edu has no host driver), and it binds again.
    let rel = release(&root, bdf).map_err(|e| e.to_string())?;
    println!("release: {rel:?}");
    ensure(rel.was_bound && rel.new_driver.is_none(), "release report")?;
    let rebound =
        bind_to_vfio_pci(&root, bdf, BindOptions::default()).map_err(|e| e.to_string())?;
    ensure(rebound.changed, "rebind after release")?;
    Ok(())
}
