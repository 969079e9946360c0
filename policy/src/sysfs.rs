//! Device checks that need the host's sysfs: IOMMU groups, `id=` pins, host-critical devices.
//!
//! Reads `<root>/bus/pci/devices/<bdf>/iommu_group` (a symlink whose last component is the
//! group number), `<root>/kernel/iommu_groups/<n>/devices/*`, and the device's `vendor`,
//! `device`, `class` and `boot_vga` files. `root` is `/sys` on a host; tests pass a fake
//! tree.

use crate::ast::{Bdf, DeviceId};
use crate::diag::Diagnostic;
use crate::eval::Policy;
use crate::parse::parse_bdf;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The default sysfs root.
pub const SYSFS_ROOT: &str = "/sys";

fn dev_dir(root: &Path, bdf: Bdf) -> std::path::PathBuf {
    root.join("bus/pci/devices").join(bdf.to_string())
}

/// The IOMMU group number of `bdf`.
pub fn iommu_group(root: &Path, bdf: Bdf) -> Result<u32, String> {
    let link = dev_dir(root, bdf).join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: unexpected target {}", link.display(), target.display()))
}

/// The PCI functions in IOMMU group `group`, sorted.
pub fn group_members(root: &Path, group: u32) -> Result<Vec<Bdf>, String> {
    let dir = root
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let bdf =
            parse_bdf(&format!("pci:{name}")).map_err(|e| format!("{}: {e}", dir.display()))?;
        out.push(bdf);
    }
    out.sort();
    Ok(out)
}

fn read_hex(path: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    u32::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// Why the host needs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostCritical {
    /// The host bridge (class 0x0600): never given away.
    HostBridge,
    /// The boot VGA device (`boot_vga` = 1): given only by a grant with `boot-display=take`.
    BootDisplay,
}

impl HostCritical {
    /// What the device is, for a diagnostic.
    pub fn what(self) -> &'static str {
        match self {
            HostCritical::HostBridge => "the host bridge",
            HostCritical::BootDisplay => "the boot display (console)",
        }
    }
}

/// Why a device is host-critical, if it is: the host bridge, or the boot display.
pub fn host_critical(root: &Path, bdf: Bdf) -> Option<HostCritical> {
    let d = dev_dir(root, bdf);
    if read_hex(&d.join("class")).is_some_and(|c| c >> 8 == 0x0600) {
        return Some(HostCritical::HostBridge);
    }
    if std::fs::read_to_string(d.join("boot_vga")).is_ok_and(|s| s.trim() == "1") {
        return Some(HostCritical::BootDisplay);
    }
    None
}

/// Check every device grant of `policy` against sysfs at `root`: the device exists, its
/// vendor:device matches `id=`, it is not host-critical (unless `force`), and its IOMMU group
/// is not split between VMs (or between a VM and the host).
pub fn check_devices(policy: &Policy, root: &Path, force: bool) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let devices = policy.all_devices();
    if devices.is_empty() {
        return out;
    }
    if !root.join("bus/pci/devices").is_dir() {
        out.push(
            Diagnostic::warning(
                &root.display().to_string(),
                0,
                0,
                "no PCI devices in sysfs; IOMMU groups not checked",
            )
            .with_help("pass --sysfs-root DIR to check against another host's sysfs"),
        );
        return out;
    }
    let mut owners: BTreeMap<Bdf, BTreeSet<&str>> = BTreeMap::new();
    for (vm, d) in &devices {
        owners.entry(d.bdf).or_default().insert(vm);
    }
    let mut groups_done = BTreeSet::new();
    for (_vm, d) in &devices {
        let file = d.at.file.to_string();
        let line = d.at.line;
        let dir = dev_dir(root, d.bdf);
        if !dir.exists() {
            out.push(
                Diagnostic::warning(
                    &file,
                    line,
                    0,
                    format!("pci:{} is not present on this host", d.bdf),
                )
                .with_help("check the address with `lspci -D` (fine for staged policy)"),
            );
            continue;
        }
        if let DeviceId::Pinned { vendor, device } = d.id {
            let v = read_hex(&dir.join("vendor"));
            let dv = read_hex(&dir.join("device"));
            if v != Some(u32::from(vendor)) || dv != Some(u32::from(device)) {
                let found = match (v, dv) {
                    (Some(a), Some(b)) => format!("{a:04x}:{b:04x}"),
                    _ => "unreadable".into(),
                };
                out.push(
                    Diagnostic::error(
                        &file,
                        line,
                        0,
                        format!("pci:{} is {found}, but the grant pins id={}", d.bdf, d.id),
                    )
                    .with_help("the device at this address changed; check `lspci -nn` and fix id="),
                );
            }
        }
        match host_critical(root, d.bdf) {
            Some(HostCritical::BootDisplay) if d.boot_display => {}
            Some(HostCritical::BootDisplay) if !force => out.push(
                Diagnostic::error(
                    &file,
                    line,
                    0,
                    format!("pci:{} is {}", d.bdf, HostCritical::BootDisplay.what()),
                )
                .with_help(
                    "giving it to a VM takes the host's screen; add boot-display=take to the \
                     grant if you mean it (init then stops using it for its console)",
                ),
            ),
            Some(why) if !force => out.push(
                Diagnostic::error(&file, line, 0, format!("pci:{} is {}", d.bdf, why.what()))
                    .with_help(
                        "giving it to a VM takes it from the host; pass --force if you really \
                         mean it",
                    ),
            ),
            _ => {}
        }
        let group = match iommu_group(root, d.bdf) {
            Ok(g) => g,
            Err(e) => {
                out.push(
                    Diagnostic::error(
                        &file,
                        line,
                        0,
                        format!("pci:{} has no IOMMU group ({e})", d.bdf),
                    )
                    .with_help("enable the IOMMU (intel_iommu=on / amd_iommu=on); VFIO needs it"),
                );
                continue;
            }
        };
        if !groups_done.insert(group) {
            continue;
        }
        let members = match group_members(root, group) {
            Ok(m) => m,
            Err(e) => {
                out.push(Diagnostic::error(
                    &file,
                    line,
                    0,
                    format!("cannot read IOMMU group {group}: {e}"),
                ));
                continue;
            }
        };
        let mine = owners.get(&d.bdf).cloned().unwrap_or_default();
        let split = members
            .iter()
            .any(|m| owners.get(m).cloned().unwrap_or_default() != mine);
        if split {
            let list: Vec<String> = members
                .iter()
                .map(|m| {
                    let o = owners
                        .get(m)
                        .map(|s| s.iter().copied().collect::<Vec<_>>().join("+"));
                    format!("{m} → {}", o.unwrap_or_else(|| "host (not granted)".into()))
                })
                .collect();
            out.push(
                Diagnostic::error(
                    &file,
                    line,
                    0,
                    format!("IOMMU group {group} is split: {}", list.join(", ")),
                )
                .with_help(
                    "every function of an IOMMU group must go to the same VM; grant the others too",
                ),
            );
        }
    }
    out
}

/// Build a fake sysfs tree (for tests here and in `policy/tests/`): each device is
/// `(bdf, vendor, device, class, iommu group)`.
pub fn build_fake_sysfs(
    root: &Path,
    devices: &[(&str, u16, u16, u32, u32)],
) -> std::io::Result<()> {
    for (bdf, vendor, device, class, group) in devices {
        let d = root.join("bus/pci/devices").join(bdf);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("vendor"), format!("0x{vendor:04x}\n"))?;
        std::fs::write(d.join("device"), format!("0x{device:04x}\n"))?;
        std::fs::write(d.join("class"), format!("0x{class:06x}\n"))?;
        let g = root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        std::fs::create_dir_all(&g)?;
        std::fs::write(g.join(bdf), b"")?;
        let link = d.join("iommu_group");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("../../../../kernel/iommu_groups/{group}"), link)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::policy;

    const NIC: u32 = 0x028000;

    fn fake() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        build_fake_sysfs(
            dir.path(),
            &[
                ("0000:00:00.0", 0x8086, 0x4641, 0x060000, 0),
                ("0000:03:00.0", 0x8086, 0x2723, NIC, 7),
                ("0000:04:00.0", 0x10ec, 0x8168, NIC, 8),
                ("0000:04:00.1", 0x10ec, 0x8169, NIC, 8),
            ],
        )
        .unwrap();
        dir
    }

    fn msgs(d: &[Diagnostic]) -> Vec<String> {
        d.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn fake_sysfs_reads_groups() {
        let s = fake();
        let b = parse_bdf("pci:0000:04:00.1").unwrap();
        assert_eq!(iommu_group(s.path(), b), Ok(8));
        assert_eq!(group_members(s.path(), 8).unwrap().len(), 2);
    }

    #[test]
    fn fake_sysfs_whole_group_ok() {
        let s = fake();
        let p = policy(&[("a.policy", "grant net-vm device pci:0000:03:00.0 id=8086:2723\ngrant eth-vm device pci:0000:04:00.0 id=any\ngrant eth-vm device pci:0000:04:00.1 id=10ec:8169\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(d.is_empty(), "{:?}", msgs(&d));
    }

    #[test]
    fn fake_sysfs_split_group_rejected() {
        let s = fake();
        let p = policy(&[("a.policy", "grant eth-vm device pci:0000:04:00.0 id=any\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter().any(|d| d.is_error()
                && d.line == 1
                && d.message.contains("IOMMU group 8 is split")
                && d.message.contains("0000:04:00.1 → host")),
            "{:?}",
            msgs(&d)
        );
        let p = policy(&[(
            "a.policy",
            "grant a device pci:0000:04:00.0 id=any\ngrant b device pci:0000:04:00.1 id=any\n",
        )]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter()
                .any(|d| d.message.contains("0000:04:00.0 → a, 0000:04:00.1 → b")),
            "{:?}",
            msgs(&d)
        );
    }

    #[test]
    fn fake_sysfs_id_mismatch_rejected() {
        let s = fake();
        let p = policy(&[(
            "a.policy",
            "grant net-vm device pci:0000:03:00.0 id=8086:0001\n",
        )]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter()
                .any(|d| d.is_error() && d.message.contains("is 8086:2723")),
            "{:?}",
            msgs(&d)
        );
    }

    #[test]
    fn fake_sysfs_host_bridge_needs_force() {
        let s = fake();
        let p = policy(&[("a.policy", "grant a device pci:0000:00:00.0 id=any\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter()
                .any(|d| d.is_error() && d.message.contains("host bridge")),
            "{:?}",
            msgs(&d)
        );
        assert!(check_devices(&p, s.path(), true)
            .iter()
            .all(|d| !d.is_error()));
    }

    /// The boot VGA device goes to a VM only by a grant that says so (`boot-display=take`);
    /// without it the check refuses it and names the keyword.
    #[test]
    fn the_boot_display_needs_boot_display_take_in_its_grant() {
        let s = fake();
        std::fs::write(
            s.path().join("bus/pci/devices/0000:03:00.0/boot_vga"),
            "1\n",
        )
        .unwrap();
        let p = policy(&[("a.policy", "grant gui-vm device pci:0000:03:00.0 id=any\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter().any(|d| d.is_error()
                && d.message.contains("boot display")
                && d.help
                    .as_deref()
                    .is_some_and(|h| h.contains("boot-display=take"))),
            "{:?}",
            msgs(&d)
        );
        let p = policy(&[(
            "a.policy",
            "grant gui-vm device pci:0000:03:00.0 id=any boot-display=take\n",
        )]);
        let d = check_devices(&p, s.path(), false);
        assert!(d.iter().all(|d| !d.is_error()), "{:?}", msgs(&d));
        // The keyword takes the boot display only: the host bridge still needs --force.
        let p = policy(&[(
            "a.policy",
            "grant gui-vm device pci:0000:00:00.0 id=any boot-display=take\n",
        )]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter()
                .any(|d| d.is_error() && d.message.contains("host bridge")),
            "{:?}",
            msgs(&d)
        );
    }

    #[test]
    fn fake_sysfs_missing_device_and_group() {
        let s = fake();
        let p = policy(&[("a.policy", "grant a device pci:0000:09:00.0 id=any\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter().all(|d| !d.is_error()) && d.iter().any(|d| d.message.contains("not present")),
            "{:?}",
            msgs(&d)
        );
        std::fs::remove_file(s.path().join("bus/pci/devices/0000:03:00.0/iommu_group")).unwrap();
        let p = policy(&[("a.policy", "grant a device pci:0000:03:00.0 id=any\n")]);
        let d = check_devices(&p, s.path(), false);
        assert!(
            d.iter()
                .any(|d| d.is_error() && d.message.contains("no IOMMU group")),
            "{:?}",
            msgs(&d)
        );
    }
}
