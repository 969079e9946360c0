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
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// A shared mapping of a sysfs PCI resource file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn of(path: &Path, len: usize) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: maps `len` bytes of an open resource file; the result is checked and only
        // used through this struct, which unmaps it on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write_u16(&self, at: usize, v: u16) {
        if at + 2 > self.len {
            return;
        }
        // SAFETY: in bounds (checked above) of a live mapping; device memory wants volatile.
        unsafe { std::ptr::write_volatile(self.ptr.add(at).cast::<u16>(), v) }
    }

    fn write_u32(&self, at: usize, v: u32) {
        if at + 4 > self.len {
            return;
        }
        // SAFETY: as in `write_u16`.
        unsafe { std::ptr::write_volatile(self.ptr.add(at).cast::<u32>(), v) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `of` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
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
    let regs = Mapping::of(&dev.join("resource2"), 4096)?;
    let reg = |i: usize, v: u16| regs.write_u16(DISPI + 2 * i, v);
    reg(DISPI_ENABLE, 0);
    reg(DISPI_XRES, WIDTH as u16);
    reg(DISPI_YRES, HEIGHT as u16);
    reg(DISPI_BPP, 32);
    reg(DISPI_VIRT_WIDTH, WIDTH as u16);
    reg(DISPI_VIRT_HEIGHT, HEIGHT as u16);
    reg(DISPI_X_OFFSET, 0);
    reg(DISPI_Y_OFFSET, 0);
    reg(DISPI_ENABLE, DISPI_ON);
    let fb = Mapping::of(&dev.join("resource0"), WIDTH * HEIGHT * 4)?;
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let colour = BARS.get(x / (WIDTH / BARS.len())).copied().unwrap_or(0);
            fb.write_u32((y * WIDTH + x) * 4, colour);
        }
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

const EV_KEY: u16 = 1;
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
    let mut ev = [0u8; 24];
    loop {
        kbd.read_exact(&mut ev)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if bulkhead_init::input::decode_event(&ev) == Some((EV_KEY, KEY_K, 1)) {
            break;
        }
    }
    let pid = bulkhead_init::control::kill_service(service)?;
    Ok(format!("screen-killer: killed {service} (pid {pid})"))
}
