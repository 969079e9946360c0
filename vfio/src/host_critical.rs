//! Devices the host itself needs, which must never be handed to a VM.
//!
//! Checked before any sysfs write, so that a refusal changes nothing:
//! - **always refused**: host bridges (class 0x0600, the host's own PCI root),
//!   PCI-to-PCI and CardBus bridges (vfio-pci only drives ordinary functions), and any
//!   function below which sits a block device with a mounted filesystem (the boot disk
//!   included). Each mount's device is looked up in `<sys>/dev/block/<major:minor>`
//!   (and by its source `/dev/<name>` in `<sys>/class/block`, since btrfs reports an
//!   anonymous device number); its real sysfs path is compared with the function's,
//!   following `slaves/` down through device-mapper and md devices. This works at any
//!   depth (a USB disk sits ten levels below its controller).
//! - **refused unless `force`** (these are heuristics for "the console"): a function
//!   that provides a tty that `/dev/console` writes to (`class/tty/console/active`, each
//!   tty's `device` link), a communication controller (class 0x07xx, e.g. a serial
//!   port) or display controller (class 0x03xx) bound to a host driver, and the boot
//!   VGA device (`boot_vga` = 1), whose framebuffer a firmware console may use without
//!   any PCI driver.
//!
//! Not checked: swap on a block device, and a network interface the host relies on.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Result, VfioError};
use crate::sysfs::{
    read_optional, PciFunction, SysfsRoot, CLASS_CARDBUS_BRIDGE, CLASS_HOST_BRIDGE,
    CLASS_PCI_BRIDGE,
};

/// How many levels of stacked block devices (`slaves/`) to follow.
const MAX_STACK_DEPTH: usize = 8;

/// Why the host needs `func`, or `None` when it may be passed through.
/// `force` skips the console heuristics but never the bridge and mount checks.
pub fn host_critical_reason(
    root: &SysfsRoot,
    func: &PciFunction,
    force: bool,
) -> Result<Option<String>> {
    match func.class_code() {
        CLASS_HOST_BRIDGE => {
            return Ok(Some(
                "it is a host bridge (class 0x0600), the host's own PCI root".to_string(),
            ))
        }
        CLASS_PCI_BRIDGE | CLASS_CARDBUS_BRIDGE => {
            return Ok(Some(format!(
                "it is a bridge (class {:#06x}); vfio-pci only drives ordinary functions",
                func.class_code()
            )))
        }
        _ => {}
    }

    let dir = fs::canonicalize(&func.path).map_err(|e| VfioError::io(&func.path, e))?;
    if let Some(reason) = mounted_reason(root, &dir)? {
        return Ok(Some(reason));
    }
    if force {
        return Ok(None);
    }
    console_reason(root, func, &dir)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The real path of a sysfs link, or `None` when it does not exist.
fn resolve(path: &Path) -> Result<Option<PathBuf>> {
    match fs::canonicalize(path) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VfioError::io(path, e)),
    }
}

/// If the block device at `dev_dir` (a real sysfs directory), or one it is stacked
/// on, lies below `func_dir`, returns that device's name.
fn block_below(dev_dir: &Path, func_dir: &Path, depth: usize) -> Result<Option<String>> {
    if dev_dir.starts_with(func_dir) {
        return Ok(Some(file_name(dev_dir)));
    }
    if depth >= MAX_STACK_DEPTH {
        return Ok(None);
    }
    let slaves = dev_dir.join("slaves");
    let entries = match fs::read_dir(&slaves) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VfioError::io(&slaves, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| VfioError::io(&slaves, e))?;
        if let Some(lower) = resolve(&entry.path())? {
            if let Some(name) = block_below(&lower, func_dir, depth + 1)? {
                return Ok(Some(name));
            }
        }
    }
    Ok(None)
}

/// One line of mountinfo: what is mounted where.
struct Mount {
    dev: String,
    mount_point: String,
    source: String,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split_whitespace().collect();
            let dev = fields.get(2)?;
            let mount_point = fields.get(4)?;
            let source = right.split_whitespace().nth(1).unwrap_or("");
            Some(Mount {
                dev: dev.to_string(),
                mount_point: mount_point.to_string(),
                source: source.to_string(),
            })
        })
        .collect()
}

fn mounted_reason(root: &SysfsRoot, func_dir: &Path) -> Result<Option<String>> {
    let path = root.mountinfo();
    let text = fs::read_to_string(path).map_err(|e| VfioError::io(path, e))?;
    for mount in parse_mountinfo(&text) {
        let mut candidates = Vec::new();
        // "0:45" and the like are anonymous devices with no sysfs entry.
        if !mount.dev.starts_with("0:") {
            candidates.push(root.sys().join("dev/block").join(&mount.dev));
        }
        if let Some(name) = mount.source.strip_prefix("/dev/") {
            if !name.is_empty() && !name.contains('/') {
                candidates.push(root.sys().join("class/block").join(name));
            }
        }
        for candidate in candidates {
            let Some(dev_dir) = resolve(&candidate)? else {
                continue;
            };
            if let Some(name) = block_below(&dev_dir, func_dir, 0)? {
                return Ok(Some(format!(
                    "it holds block device {name}, on which {} is mounted ({} {})",
                    mount.mount_point, mount.source, mount.dev
                )));
            }
        }
    }
    Ok(None)
}

fn console_reason(root: &SysfsRoot, func: &PciFunction, func_dir: &Path) -> Result<Option<String>> {
    let active = read_optional(&root.console_active_path())?.unwrap_or_default();
    for tty in active.split_whitespace() {
        let link = root.sys().join("class/tty").join(tty).join("device");
        if let Some(device) = resolve(&link)? {
            if device.starts_with(func_dir) {
                return Ok(Some(format!(
                    "it provides {tty}, a tty behind /dev/console (pass force to override)"
                )));
            }
        }
    }
    if let Some(driver) = &func.driver {
        let kind = match func.base_class() {
            0x03 => Some("display controller"),
            0x07 => Some("communication (serial) controller"),
            _ => None,
        };
        if let Some(kind) = kind {
            return Ok(Some(format!(
                "it is a {kind} (class {:#06x}) bound to host driver {driver}, which may back \
                 the console (pass force to override)",
                func.class_code()
            )));
        }
    }
    if read_optional(&func.path.join("boot_vga"))?
        .as_deref()
        .map(str::trim)
        == Some("1")
    {
        return Ok(Some(
            "it is the boot VGA device, whose framebuffer may back the console \
             (pass force to override)"
                .to_string(),
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    garbage\n\
                    30 27 0:45 / /home rw shared:1 - btrfs /dev/nvme0n1p2 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dev, "254:0");
        assert_eq!(m[0].mount_point, "/");
        assert_eq!(m[0].source, "/dev/vda");
        assert_eq!(m[2].source, "/dev/nvme0n1p2");
        assert_eq!(m[2].mount_point, "/home");
    }
}
