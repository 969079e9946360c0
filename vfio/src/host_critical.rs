//! Devices the host itself needs, which must never be handed to a VM.
//!
//! Checked before any sysfs write, so that a refusal changes nothing:
//! - **always refused**: host bridges (class 0x0600, the host's own PCI root),
//!   PCI-to-PCI and CardBus bridges (vfio-pci only drives ordinary functions), and any
//!   function holding a block device on which a filesystem is mounted (the boot disk
//!   included). The block devices are found under the function's sysfs directory; a
//!   device-mapper/md device stacked on one of them (`holders/`) counts too. A mount
//!   matches by `major:minor` or by its source being `/dev/<name>` (btrfs reports an
//!   anonymous device number).
//! - **refused unless `force`** (these are heuristics for "the console"): a function
//!   with a tty that `/dev/console` writes to (`class/tty/console/active`), a
//!   communication controller (class 0x07xx, e.g. a serial port) or display controller
//!   (class 0x03xx) bound to a host driver, and the boot VGA device (`boot_vga` = 1),
//!   whose framebuffer a firmware console may use without any PCI driver.
//!
//! Not checked: swap on a block device, and a network interface the host relies on.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Result, VfioError};
use crate::sysfs::{
    link_name, read_optional, PciFunction, SysfsRoot, CLASS_CARDBUS_BRIDGE, CLASS_HOST_BRIDGE,
    CLASS_PCI_BRIDGE,
};

/// How deep to look below a function's sysfs directory for block devices and ttys.
const MAX_DEPTH: usize = 8;
/// How many levels of stacked block devices (`holders/`) to follow.
const MAX_HOLDER_DEPTH: usize = 4;

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

    let dir = real_dir(&func.path)?;
    let mut found = Found::default();
    walk(&dir, 0, &mut found)?;

    if let Some(reason) = mounted_reason(root, &found)? {
        return Ok(Some(reason));
    }
    if force {
        return Ok(None);
    }
    console_reason(root, func, &found)
}

/// Block devices and ttys found below a function.
#[derive(Default)]
struct Found {
    /// (name, "major:minor", sysfs directory)
    block: Vec<(String, String, PathBuf)>,
    ttys: BTreeSet<String>,
}

fn real_dir(path: &Path) -> Result<PathBuf> {
    fs::canonicalize(path).map_err(|e| VfioError::io(path, e))
}

fn walk(dir: &Path, depth: usize, found: &mut Found) -> Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    if is_block_device(dir)? {
        if let Some(dev) = read_optional(&dir.join("dev"))? {
            let name = file_name(dir);
            found
                .block
                .push((name, dev.trim().to_string(), dir.to_path_buf()));
        }
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        // Unreadable corners of sysfs (permissions) hold no block devices we could see.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(()),
        Err(e) => return Err(VfioError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| VfioError::io(dir, e))?;
        let ty = entry
            .file_type()
            .map_err(|e| VfioError::io(entry.path(), e))?;
        // Never follow links: sysfs links point all over the tree.
        if !ty.is_dir() {
            continue;
        }
        let path = entry.path();
        if entry.file_name() == "tty" {
            for tty in fs::read_dir(&path).map_err(|e| VfioError::io(&path, e))? {
                let tty = tty.map_err(|e| VfioError::io(&path, e))?;
                found
                    .ttys
                    .insert(tty.file_name().to_string_lossy().into_owned());
            }
        }
        walk(&path, depth + 1, found)?;
    }
    Ok(())
}

fn is_block_device(dir: &Path) -> Result<bool> {
    Ok(link_name(&dir.join("subsystem"))?.as_deref() == Some("block"))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Adds every device stacked on `dir` (dm, md, …) to `out`.
fn holders(dir: &Path, depth: usize, out: &mut Vec<(String, String)>) -> Result<()> {
    if depth > MAX_HOLDER_DEPTH {
        return Ok(());
    }
    let hdir = dir.join("holders");
    let entries = match fs::read_dir(&hdir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(VfioError::io(&hdir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| VfioError::io(&hdir, e))?;
        let Ok(target) = fs::canonicalize(entry.path()) else {
            continue;
        };
        if let Some(dev) = read_optional(&target.join("dev"))? {
            out.push((file_name(&target), dev.trim().to_string()));
        }
        holders(&target, depth + 1, out)?;
    }
    Ok(())
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

fn mounted_reason(root: &SysfsRoot, found: &Found) -> Result<Option<String>> {
    if found.block.is_empty() {
        return Ok(None);
    }
    let mut devices: Vec<(String, String)> = Vec::new();
    for (name, dev, dir) in &found.block {
        devices.push((name.clone(), dev.clone()));
        holders(dir, 0, &mut devices)?;
    }
    let path = root.mountinfo();
    let text = fs::read_to_string(path).map_err(|e| VfioError::io(path, e))?;
    for mount in parse_mountinfo(&text) {
        for (name, dev) in &devices {
            if &mount.dev == dev || mount.source == format!("/dev/{name}") {
                return Ok(Some(format!(
                    "it holds block device {name} ({dev}), on which {} is mounted",
                    mount.mount_point
                )));
            }
        }
    }
    Ok(None)
}

fn console_reason(root: &SysfsRoot, func: &PciFunction, found: &Found) -> Result<Option<String>> {
    let active = read_optional(&root.console_active_path())?.unwrap_or_default();
    if let Some(tty) = active.split_whitespace().find(|t| found.ttys.contains(*t)) {
        return Ok(Some(format!(
            "it provides {tty}, a tty behind /dev/console (pass force to override)"
        )));
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
