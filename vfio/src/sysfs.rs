//! PCI functions as sysfs describes them, under a configurable root.
//!
//! Everything here only reads. The roots are configurable so that tests can build a
//! fake tree in a temporary directory and so that init can look at a sysfs mounted
//! somewhere other than `/sys`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::bdf::Bdf;
use crate::error::{Result, VfioError};

/// The name of the driver that hands PCI functions to user space.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// PCI class code of a host bridge (base class 0x06, subclass 0x00).
pub const CLASS_HOST_BRIDGE: u16 = 0x0600;
/// PCI class code of a PCI-to-PCI bridge.
pub const CLASS_PCI_BRIDGE: u16 = 0x0604;
/// PCI class code of a CardBus bridge.
pub const CLASS_CARDBUS_BRIDGE: u16 = 0x0607;

/// Where this crate looks for sysfs, device nodes and the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsRoot {
    sys: PathBuf,
    dev: PathBuf,
    mountinfo: PathBuf,
}

impl SysfsRoot {
    /// A root at `sys` (normally `/sys`), with device nodes under `/dev` and the mount
    /// table read from `/proc/self/mountinfo`.
    pub fn new(sys: impl Into<PathBuf>) -> Self {
        SysfsRoot {
            sys: sys.into(),
            dev: PathBuf::from("/dev"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }

    /// The running host: `/sys`, `/dev`, `/proc/self/mountinfo`.
    pub fn host() -> Self {
        Self::new("/sys")
    }

    /// Looks for `vfio/vfio` and `vfio/<group>` under `dev` instead of `/dev`.
    pub fn with_dev_root(mut self, dev: impl Into<PathBuf>) -> Self {
        self.dev = dev.into();
        self
    }

    /// Reads the mount table (mountinfo format) from `path` instead of
    /// `/proc/self/mountinfo`.
    pub fn with_mountinfo(mut self, path: impl Into<PathBuf>) -> Self {
        self.mountinfo = path.into();
        self
    }

    /// The sysfs root.
    pub fn sys(&self) -> &Path {
        &self.sys
    }

    /// The device-node root.
    pub fn dev(&self) -> &Path {
        &self.dev
    }

    /// The mount table file.
    pub fn mountinfo(&self) -> &Path {
        &self.mountinfo
    }

    /// `<sys>/bus/pci/devices`: one link per PCI function.
    pub fn pci_devices_dir(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    /// `<sys>/bus/pci/devices/<bdf>`.
    pub fn function_path(&self, bdf: Bdf) -> PathBuf {
        self.pci_devices_dir().join(bdf.to_string())
    }

    /// `<sys>/bus/pci/drivers_probe`: writing a BDF asks the kernel to find it a driver.
    pub fn drivers_probe_path(&self) -> PathBuf {
        self.sys.join("bus/pci/drivers_probe")
    }

    /// `<sys>/bus/pci/drivers/<name>`.
    pub fn pci_driver_dir(&self, name: &str) -> PathBuf {
        self.sys.join("bus/pci/drivers").join(name)
    }

    /// `<sys>/kernel/iommu_groups`.
    pub fn iommu_groups_dir(&self) -> PathBuf {
        self.sys.join("kernel/iommu_groups")
    }

    /// `<sys>/kernel/iommu_groups/<group>/devices`.
    pub fn group_devices_dir(&self, group: u32) -> PathBuf {
        self.iommu_groups_dir()
            .join(group.to_string())
            .join("devices")
    }

    /// `<sys>/class/tty/console/active`: the ttys behind /dev/console.
    pub fn console_active_path(&self) -> PathBuf {
        self.sys.join("class/tty/console/active")
    }

    /// `<dev>/vfio/vfio`: the VFIO container device.
    pub fn vfio_container_node(&self) -> PathBuf {
        self.dev.join("vfio/vfio")
    }

    /// `<dev>/vfio/<group>`: the group's character device, present once a member is
    /// bound to vfio-pci.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        self.dev.join("vfio").join(group.to_string())
    }

    /// Whether the kernel has an IOMMU: `<sys>/kernel/iommu_groups` exists and is not
    /// empty.
    pub fn has_iommu(&self) -> Result<bool> {
        let dir = self.iommu_groups_dir();
        match fs::read_dir(&dir) {
            Ok(mut entries) => match entries.next() {
                Some(Ok(_)) => Ok(true),
                Some(Err(e)) => Err(VfioError::io(&dir, e)),
                None => Ok(false),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VfioError::io(&dir, e)),
        }
    }

    /// [`Self::has_iommu`], as an error when there is none.
    pub fn require_iommu(&self) -> Result<()> {
        if self.has_iommu()? {
            Ok(())
        } else {
            Err(VfioError::NoIommu {
                path: self.iommu_groups_dir(),
            })
        }
    }

    /// Every PCI function, sorted by address. A system without PCI has none.
    pub fn functions(&self) -> Result<Vec<PciFunction>> {
        let dir = self.pci_devices_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(VfioError::io(&dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| VfioError::io(&dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let bdf: Bdf = name.parse().map_err(|_| VfioError::Malformed {
                path: entry.path(),
                value: name.to_string(),
                reason: "entry of bus/pci/devices is not a PCI address",
            })?;
            out.push(self.function(bdf)?);
        }
        out.sort_by_key(|f| f.bdf);
        Ok(out)
    }

    /// One PCI function, read from sysfs now.
    pub fn function(&self, bdf: Bdf) -> Result<PciFunction> {
        let path = self.function_path(bdf);
        match fs::metadata(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VfioError::DeviceMissing { bdf, path })
            }
            Err(e) => return Err(VfioError::io(&path, e)),
        }
        let vendor = read_hex(&path.join("vendor"), 0xffff)? as u16;
        let device = read_hex(&path.join("device"), 0xffff)? as u16;
        let class = read_hex(&path.join("class"), 0xff_ffff)?;
        let driver = link_name(&path.join("driver"))?;
        let driver_override = read_optional(&path.join("driver_override"))?
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        let iommu_group = match link_name(&path.join("iommu_group"))? {
            None => None,
            Some(name) => Some(name.parse::<u32>().map_err(|_| VfioError::Malformed {
                path: path.join("iommu_group"),
                value: name,
                reason: "iommu_group link does not end in a group number",
            })?),
        };
        let reset_methods = read_optional(&path.join("reset_method"))?
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        Ok(PciFunction {
            bdf,
            path,
            vendor,
            device,
            class,
            driver,
            driver_override,
            iommu_group,
            reset_methods,
        })
    }
}

/// What sysfs says about one PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: Bdf,
    /// `<sys>/bus/pci/devices/<bdf>`.
    pub path: PathBuf,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// 24-bit class code: base class, subclass, programming interface.
    pub class: u32,
    /// The driver it is bound to (the `driver` link), if any.
    pub driver: Option<String>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// Its IOMMU group, if the kernel has an IOMMU that covers it.
    pub iommu_group: Option<u32>,
    /// The reset methods the kernel can use (`reset_method`, e.g. `flr`, `pm`, `bus`);
    /// empty when the function cannot be reset or the kernel does not say.
    pub reset_methods: Vec<String>,
}

impl PciFunction {
    /// Base class and subclass, e.g. 0x0600 for a host bridge.
    pub fn class_code(&self) -> u16 {
        (self.class >> 8) as u16
    }

    /// The base class, e.g. 0x03 for display controllers.
    pub fn base_class(&self) -> u8 {
        (self.class >> 16) as u8
    }

    /// A PCI-to-PCI or CardBus bridge (not a host bridge).
    pub fn is_bridge(&self) -> bool {
        matches!(self.class_code(), CLASS_PCI_BRIDGE | CLASS_CARDBUS_BRIDGE)
    }

    /// Bound to vfio-pci now.
    pub fn is_bound_to_vfio_pci(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_PCI_DRIVER)
    }
}

/// Reads a sysfs attribute; `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VfioError::io(path, e)),
    }
}

/// The last component of a symlink's target; `None` when there is no link.
pub(crate) fn link_name(path: &Path) -> Result<Option<String>> {
    match fs::read_link(path) {
        Ok(target) => match target.file_name() {
            Some(name) => Ok(Some(name.to_string_lossy().into_owned())),
            None => Err(VfioError::Malformed {
                path: path.to_path_buf(),
                value: target.to_string_lossy().into_owned(),
                reason: "link target has no final component",
            }),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(VfioError::io(path, e)),
    }
}

/// Reads a `0x…` attribute no larger than `max`.
fn read_hex(path: &Path, max: u32) -> Result<u32> {
    let raw = fs::read_to_string(path).map_err(|e| VfioError::io(path, e))?;
    let value = raw.trim();
    let digits = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .unwrap_or(value);
    match u32::from_str_radix(digits, 16) {
        Ok(v) if v <= max && digits.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(v),
        _ => Err(VfioError::Malformed {
            path: path.to_path_buf(),
            value: value.to_string(),
            reason: "expected a hexadecimal number such as 0x1234",
        }),
    }
}
