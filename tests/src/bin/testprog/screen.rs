//! The `display` system's two sides of a screen passed through to a VM.
//!
//! * `screen-draw` (in the L2 guest that owns QEMU's `bochs-display` by VFIO): sets a
//!   640x480x32 mode through the device's own registers (the Bochs VBE "DISPI" interface in
//!   its MMIO BAR 2, at 0x500) and fills the framebuffer (BAR 0) with eight vertical colour
//!   bars, with no driver in the guest kernel (the cloud kernel has no DRM). The test reads
//!   the result from QEMU (`screendump`), never from this program's word.
//! * `screen-killer` (in the L1 host): waits for a press of `k` on the emulated host's
//!   keyboard (the test sends it over QMP) and kills a service with SIGKILL through init's
//!   control socket, the way a crashed or killed VMM ends: no clean-up of its own runs.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use bulkhead_init::input::{decode_event, EV_KEY, INPUT_EVENT_SIZE};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// The screen's mode.
pub const WIDTH: usize = 640;
pub const HEIGHT: usize = 480;
/// The bars, left to right, as the framebuffer holds them (x8r8g8b8).
pub const BARS: [u32; 8] = [
    0x00ff_0000,
    0x0000_ff00,
    0x0000_00ff,
    0x00ff_ffff,
    0x00ff_ff00,
    0x0000_ffff,
    0x00ff_00ff,
    0x0080_8080,
];

const VENDOR: &str = "0x1234";
const DEVICE: &str = "0x1111";
/// DISPI registers: 16 bits each at 0x500 + 2 * index of BAR 2.
const DISPI: usize = 0x500;
const DISPI_XRES: usize = 1;
const DISPI_YRES: usize = 2;
const DISPI_BPP: usize = 3;
const DISPI_ENABLE: usize = 4;
const DISPI_VIRT_WIDTH: usize = 6;
const DISPI_VIRT_HEIGHT: usize = 7;
const DISPI_X_OFFSET: usize = 8;
const DISPI_Y_OFFSET: usize = 9;
/// ENABLED | LFB_ENABLED.
const DISPI_ON: u16 = 0x41;

/// A shared mapping of `len` bytes of a sysfs PCI resource file (vm-memory's `MmapRegion`:
/// it unmaps on drop, and its volatile accessors do each access with one load or store of
/// the given width, which device registers need).
fn map_resource(path: &Path, len: usize) -> Result<MmapRegion, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    MmapRegion::from_file(FileOffset::new(file, 0), len)
        .map_err(|e| format!("mmap {}: {e}", path.display()))
}

/// The sysfs directory of the bochs-display.
fn find_screen() -> Result<PathBuf, String> {
    let dir = Path::new("/sys/bus/pci/devices");
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        if read("vendor").trim() == VENDOR && read("device").trim() == DEVICE {
            return Ok(p);
        }
    }
    Err("no bochs-display (1234:1111) on the PCI bus".into())
}

/// Sets the mode, draws the bars, keeps the VM up `hold` seconds, and ends.
pub fn draw(hold: u64) -> Result<String, String> {
    let dev = find_screen()?;
    // Memory decoding on (no driver enables the device).
    std::fs::write(dev.join("enable"), "1").map_err(|e| format!("enable: {e}"))?;
    let regs = map_resource(&dev.join("resource2"), 4096)?;
    let regs = regs.as_volatile_slice();
    for (i, v) in [
        (DISPI_ENABLE, 0),
        (DISPI_XRES, WIDTH as u16),
        (DISPI_YRES, HEIGHT as u16),
        (DISPI_BPP, 32),
        (DISPI_VIRT_WIDTH, WIDTH as u16),
        (DISPI_VIRT_HEIGHT, HEIGHT as u16),
        (DISPI_X_OFFSET, 0),
        (DISPI_Y_OFFSET, 0),
        (DISPI_ENABLE, DISPI_ON),
    ] {
        regs.store(v, DISPI + 2 * i, Ordering::SeqCst)
            .map_err(|e| format!("DISPI register {i}: {e}"))?;
    }
    let fb = map_resource(&dev.join("resource0"), WIDTH * HEIGHT * 4)?;
    let row: Vec<u8> = (0..WIDTH)
        .flat_map(|x| {
            BARS.get(x / (WIDTH / BARS.len()))
                .copied()
                .unwrap_or(0)
                .to_le_bytes()
        })
        .collect();
    for y in 0..HEIGHT {
        fb.as_volatile_slice()
            .write_slice(&row, y * WIDTH * 4)
            .map_err(|e| format!("framebuffer row {y}: {e}"))?;
    }
    println!(
        "testprog: screen: drew {} bars at {WIDTH}x{HEIGHT} on {}",
        BARS.len(),
        dev.display()
    );
    std::thread::sleep(Duration::from_secs(hold));
    Ok("screen: done".into())
}

/// The emulated host's AT keyboard's evdev node.
fn find_keyboard() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/input").ok()?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("event") {
            continue;
        }
        let dev_name = std::fs::read_to_string(e.path().join("device/name")).unwrap_or_default();
        if dev_name.contains("AT Translated Set 2 keyboard") {
            return Some(Path::new("/dev/input").join(name));
        }
    }
    None
}

const KEY_K: u16 = 37;

/// Waits for `k` on the keyboard, then SIGKILLs `service` (its jail's keeper; the service
/// dies with it).
pub fn killer(service: &str) -> Result<String, String> {
    let path = loop {
        match find_keyboard() {
            Some(p) => break p,
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut kbd = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "testprog: screen-killer: waiting for k on {}",
        path.display()
    );
    let mut ev = [0u8; INPUT_EVENT_SIZE];
    loop {
        kbd.read_exact(&mut ev)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if decode_event(&ev) == Some((EV_KEY, KEY_K, 1)) {
            break;
        }
    }
    let pid = bulkhead_init::control::kill_service(service)?;
    Ok(format!("screen-killer: killed {service} (pid {pid})"))
}
