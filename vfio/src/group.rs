//! IOMMU groups: which functions share one, and whether a VM may have it.
//!
//! The IOMMU isolates groups, not functions, so a VM gets a whole group or nothing.
//! A group is *viable* when no member is driven by a host driver that could do DMA
//! behind the VM's back. The kernel refuses to attach a group that is not viable;
//! checking here first gives an error that names the offending members.
//!
//! Rule used (it follows the kernel's own): a member is acceptable when it is
//! - bound to no driver,
//! - bound to `vfio-pci` or a vendor variant of it (a driver name containing
//!   `vfio-pci` or `vfio_pci`),
//! - bound to `pci-stub` (which never enables DMA), or
//! - a PCI-to-PCI or CardBus bridge, whatever drives it (normally `pcieport`):
//!   bridges do no DMA of their own, and the kernel ignores them too.
//!
//! Anything else, including a member that is not a PCI function but has a driver,
//! makes the group not viable.

use std::fs;
use std::io;
use std::path::Path;

use crate::error::{GroupMember, Result, VfioError};
use crate::sysfs::{link_name, read_optional, SysfsRoot, CLASS_CARDBUS_BRIDGE, CLASS_PCI_BRIDGE};

/// One entry of `kernel/iommu_groups/<n>/devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// The sysfs name: a PCI address for PCI functions.
    pub name: String,
    /// The driver it is bound to, if any.
    pub driver: Option<String>,
    /// Its 24-bit PCI class code, if it is a PCI function.
    pub class: Option<u32>,
}

impl GroupEntry {
    /// Whether this member lets the group be given to a VM (see the module docs).
    pub fn allows_passthrough(&self) -> bool {
        let is_bridge = self
            .class
            .map(|c| matches!((c >> 8) as u16, CLASS_PCI_BRIDGE | CLASS_CARDBUS_BRIDGE))
            .unwrap_or(false);
        match self.driver.as_deref() {
            None => true,
            Some(_) if is_bridge => true,
            Some(d) => is_vfio_driver(d) || d == "pci-stub",
        }
    }
}

/// `vfio-pci` itself or a vendor variant of it (`mlx5_vfio_pci`, …).
pub fn is_vfio_driver(name: &str) -> bool {
    name.contains("vfio-pci") || name.contains("vfio_pci")
}

/// The members of IOMMU group `group`, sorted by name.
pub fn group_members(root: &SysfsRoot, group: u32) -> Result<Vec<GroupEntry>> {
    let dir = root.group_devices_dir(group);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            root.require_iommu()?;
            return Err(VfioError::GroupMissing { group, path: dir });
        }
        Err(e) => return Err(VfioError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| VfioError::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        out.push(GroupEntry {
            driver: link_name(&path.join("driver"))?,
            class: read_class(&path.join("class"))?,
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Whether IOMMU group `group` may be handed to a VM: `Ok(())`, or
/// [`VfioError::GroupNotViable`] naming every member that stands in the way
/// ([`VfioError::NoIommu`] or [`VfioError::GroupMissing`] when there is no such group).
pub fn group_viable(root: &SysfsRoot, group: u32) -> Result<()> {
    root.require_iommu()?;
    let offenders: Vec<GroupMember> = group_members(root, group)?
        .into_iter()
        .filter(|m| !m.allows_passthrough())
        .map(|m| GroupMember {
            name: m.name,
            driver: m.driver,
        })
        .collect();
    if offenders.is_empty() {
        Ok(())
    } else {
        Err(VfioError::GroupNotViable {
            group,
            members: offenders,
        })
    }
}

fn read_class(path: &Path) -> Result<Option<u32>> {
    Ok(read_optional(path)?.and_then(|raw| {
        let v = raw.trim();
        let digits = v.strip_prefix("0x").unwrap_or(v);
        u32::from_str_radix(digits, 16).ok()
    }))
}
