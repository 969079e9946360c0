//! The power button: evdev devices that can report KEY_POWER. A press means an orderly
//! power-off (what logind does). With QEMU, `system_powerdown` raises the ACPI power
//! button, which the `button` module turns into such an input device.
//!
//! Devices are scanned once, after modules are loaded; hot-plugged ones are not watched,
//! and one that goes away (ENODEV) is dropped from the watch list.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use log::{debug, info, warn};

/// EV_KEY event type.
pub const EV_KEY: u16 = 1;
/// KEY_POWER key code.
pub const KEY_POWER: u16 = 116;
/// KEY_MAX (the key bitmap has KEY_MAX + 1 bits).
const KEY_MAX: usize = 0x2ff;
/// Size of `struct input_event` on 64-bit Linux: timeval (16), type (2), code (2), value (4).
pub const INPUT_EVENT_SIZE: usize = 24;
/// Most devices watched.
const MAX_DEVICES: usize = 16;

// EVIOCGBIT(EV_KEY, len) = _IOC(_IOC_READ, 'E', 0x20 + EV_KEY, len)
nix::ioctl_read_buf!(eviocgbit_key, b'E', 0x21, u8);

/// True if bit `bit` is set in a little-endian kernel bitmap.
pub fn test_bit(bitmap: &[u8], bit: usize) -> bool {
    bitmap
        .get(bit / 8)
        .is_some_and(|byte| byte & (1 << (bit % 8)) != 0)
}

/// Decodes one `struct input_event`: `(type, code, value)`.
pub fn decode_event(raw: &[u8]) -> Option<(u16, u16, i32)> {
    let ty = raw.get(16..18)?;
    let code = raw.get(18..20)?;
    let value = raw.get(20..24)?;
    Some((
        u16::from_ne_bytes([*ty.first()?, *ty.get(1)?]),
        u16::from_ne_bytes([*code.first()?, *code.get(1)?]),
        i32::from_ne_bytes(value.try_into().ok()?),
    ))
}

/// True for a KEY_POWER press (value 1; 0 is release, 2 autorepeat).
pub fn is_power_press(ty: u16, code: u16, value: i32) -> bool {
    ty == EV_KEY && code == KEY_POWER && value == 1
}

/// One opened evdev device that has KEY_POWER.
#[derive(Debug)]
pub struct PowerButton {
    /// Its path, for messages.
    pub path: PathBuf,
    file: File,
}

impl AsFd for PowerButton {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl PowerButton {
    /// A button over any readable file, for fault-injection tests (a device that goes
    /// away, faked with a pipe).
    #[doc(hidden)]
    pub fn for_test(path: PathBuf, file: File) -> Self {
        PowerButton { path, file }
    }
}

/// What reading a power button found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ButtonEvent {
    /// KEY_POWER was pressed.
    Pressed,
    /// Nothing that matters (other keys, releases, or no event after all).
    Nothing,
    /// The device went away (ENODEV: unplugged, its driver unbound or unloaded) or fails
    /// for good; why, in words.
    Gone(String),
}

impl PowerButton {
    /// Reads pending events (bounded).
    pub fn read_events(&mut self) -> ButtonEvent {
        let mut buf = [0u8; INPUT_EVENT_SIZE * 16];
        let mut pressed = false;
        for _ in 0..16 {
            match self.file.read(&mut buf) {
                // evdev never reads 0 while the device exists (no event is EAGAIN).
                Ok(0) => return ButtonEvent::Gone("end of file".to_string()),
                Ok(n) => {
                    let data = buf.get(..n).unwrap_or_default();
                    for ev in data.chunks_exact(INPUT_EVENT_SIZE) {
                        if let Some((ty, code, value)) = decode_event(ev) {
                            pressed |= is_power_press(ty, code, value);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return ButtonEvent::Gone(e.to_string()),
            }
        }
        if pressed {
            ButtonEvent::Pressed
        } else {
            ButtonEvent::Nothing
        }
    }
}

/// Reads the buttons `ready` marks (same order as `buttons`) and returns the path of one
/// that was pressed. A button that went away is logged and removed, so it leaves the poll
/// set: a vanished evdev device polls ready (POLLHUP|POLLERR) forever, and keeping it
/// would make the event loop spin.
pub fn check_ready(buttons: &mut Vec<PowerButton>, ready: &[bool]) -> Option<PathBuf> {
    let mut pressed = None;
    let mut i = 0;
    buttons.retain_mut(|b| {
        let r = ready.get(i).copied().unwrap_or(false);
        i += 1;
        if !r {
            return true;
        }
        match b.read_events() {
            ButtonEvent::Pressed => {
                pressed = pressed.take().or_else(|| Some(b.path.clone()));
                true
            }
            ButtonEvent::Nothing => true,
            ButtonEvent::Gone(why) => {
                warn!(
                    "power button {} is gone ({why}): no longer watched",
                    b.path.display()
                );
                false
            }
        }
    });
    pressed
}

fn has_power_key(file: &File) -> bool {
    let mut bits = [0u8; KEY_MAX / 8 + 1];
    // SAFETY: EVIOCGBIT writes at most bits.len() bytes (the length is encoded in the
    // request) into a live buffer we own.
    match unsafe { eviocgbit_key(std::os::fd::AsRawFd::as_raw_fd(file), &mut bits) } {
        Ok(_) => test_bit(&bits, KEY_POWER as usize),
        Err(_) => false,
    }
}

/// Opens every `event*` device under `dir` (normally /dev/input) that reports KEY_POWER.
pub fn scan(dir: &Path) -> Vec<PowerButton> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        debug!("no {}: no power button", dir.display());
        return found;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .map(|e| e.path())
        .collect();
    paths.sort();
    for path in paths {
        if found.len() >= MAX_DEVICES {
            break;
        }
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                debug!("{}: {e}", path.display());
                continue;
            }
        };
        if has_power_key(&file) {
            info!("power button: {}", path.display());
            found.push(PowerButton { path, file });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap() {
        let mut bits = [0u8; KEY_MAX / 8 + 1];
        assert!(!test_bit(&bits, 116));
        bits[116 / 8] |= 1 << (116 % 8);
        assert!(test_bit(&bits, 116));
        assert!(!test_bit(&bits, 117));
        assert!(!test_bit(&bits, 100_000));
    }

    #[test]
    fn events() {
        let mut ev = [0u8; INPUT_EVENT_SIZE];
        ev[16..18].copy_from_slice(&EV_KEY.to_ne_bytes());
        ev[18..20].copy_from_slice(&KEY_POWER.to_ne_bytes());
        ev[20..24].copy_from_slice(&1i32.to_ne_bytes());
        let (t, c, v) = decode_event(&ev).unwrap();
        assert!(is_power_press(t, c, v));
        assert!(!is_power_press(t, c, 0));
        assert!(!is_power_press(t, 115, 1));
        assert!(decode_event(&ev[..20]).is_none());
    }

    #[test]
    fn scan_of_missing_dir_is_empty() {
        assert!(scan(Path::new("/nonexistent/input")).is_empty());
    }
}
