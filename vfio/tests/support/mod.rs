//! A fake sysfs tree in a temporary directory, laid out like the kernel's, and a
//! fake kernel that reacts to the binder's writes the way Linux does.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use bulkhead_vfio::{Bdf, KernelHook, SysfsRoot, VfioError};
use tempfile::TempDir;

pub fn bdf(s: &str) -> Bdf {
    s.parse().unwrap()
}

/// A temporary `sys/`, `dev/` and `mountinfo`.
pub struct FakeSysfs {
    pub dir: TempDir,
}

impl FakeSysfs {
    /// An empty PCI bus with the given drivers registered and no IOMMU groups.
    pub fn new(drivers: &[&str]) -> Self {
        let fake = FakeSysfs {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/devices/pci0000:00",
            "sys/kernel/iommu_groups",
            "sys/class/block",
            "sys/class/tty/console",
            "dev/vfio",
        ] {
            fs::create_dir_all(fake.dir.path().join(d)).unwrap();
        }
        fs::write(fake.sys().join("bus/pci/drivers_probe"), "").unwrap();
        fs::write(fake.sys().join("class/tty/console/active"), "ttyS0\n").unwrap();
        fs::write(fake.mountinfo(), "").unwrap();
        for d in drivers {
            fake.add_driver(d);
        }
        fake
    }

    pub fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    pub fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    pub fn mountinfo(&self) -> PathBuf {
        self.dir.path().join("mountinfo")
    }

    pub fn root(&self) -> SysfsRoot {
        SysfsRoot::new(self.sys())
            .with_dev_root(self.dev())
            .with_mountinfo(self.mountinfo())
    }

    pub fn add_driver(&self, name: &str) {
        let d = self.sys().join("bus/pci/drivers").join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("bind"), "").unwrap();
        fs::write(d.join("unbind"), "").unwrap();
    }

    /// The real directory of a function (what `bus/pci/devices/<bdf>` links to).
    pub fn dev_dir(&self, bdf: &str) -> PathBuf {
        self.sys().join("devices/pci0000:00").join(bdf)
    }

    /// Adds a function with sysfs attributes as Linux writes them.
    pub fn add_function(
        &self,
        bdf: &str,
        vendor: u16,
        device: u16,
        class: u32,
        group: Option<u32>,
        driver: Option<&str>,
    ) {
        let d = self.dev_dir(bdf);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("{vendor:#06x}\n")).unwrap();
        fs::write(d.join("device"), format!("{device:#06x}\n")).unwrap();
        fs::write(d.join("class"), format!("{class:#08x}\n")).unwrap();
        fs::write(d.join("driver_override"), "(null)\n").unwrap();
        fs::write(d.join("reset_method"), "flr bus\n").unwrap();
        symlink(
            format!("../../../devices/pci0000:00/{bdf}"),
            self.sys().join("bus/pci/devices").join(bdf),
        )
        .unwrap();
        if let Some(g) = group {
            let gdir = self.sys().join(format!("kernel/iommu_groups/{g}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(
                format!("../../../../devices/pci0000:00/{bdf}"),
                gdir.join(bdf),
            )
            .unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                d.join("iommu_group"),
            )
            .unwrap();
        }
        if let Some(drv) = driver {
            self.link_driver(bdf, drv);
        }
    }

    /// What the kernel does when a driver binds.
    pub fn link_driver(&self, bdf: &str, driver: &str) {
        let d = self.dev_dir(bdf);
        symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            d.join("driver"),
        )
        .unwrap();
        let drv = self.sys().join("bus/pci/drivers").join(driver);
        symlink(
            format!("../../../../devices/pci0000:00/{bdf}"),
            drv.join(bdf),
        )
        .unwrap();
    }

    /// What the kernel does when a driver unbinds.
    pub fn unlink_driver(&self, bdf: &str) {
        let d = self.dev_dir(bdf);
        let driver = fs::read_link(d.join("driver")).unwrap();
        let name = driver.file_name().unwrap().to_string_lossy().into_owned();
        fs::remove_file(d.join("driver")).unwrap();
        fs::remove_file(self.sys().join("bus/pci/drivers").join(name).join(bdf)).unwrap();
    }

    pub fn driver_of(&self, bdf: &str) -> Option<String> {
        fs::read_link(self.dev_dir(bdf).join("driver"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }

    pub fn driver_override_of(&self, bdf: &str) -> String {
        fs::read_to_string(self.dev_dir(bdf).join("driver_override")).unwrap()
    }

    /// A block device (and its partitions) below the function, as virtio-blk makes.
    pub fn add_block_device(&self, bdf: &str, name: &str, dev: &str) -> PathBuf {
        let b = self.dev_dir(bdf).join("virtio1/block").join(name);
        self.make_block_dir(&b, dev);
        b
    }

    /// A block device directory with the links the kernel makes for it:
    /// `dev/block/<major:minor>` and `class/block/<name>`.
    pub fn make_block_dir(&self, dir: &Path, dev: &str) {
        fs::create_dir_all(dir.join("holders")).unwrap();
        fs::create_dir_all(dir.join("slaves")).unwrap();
        fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
        let depth = dir.strip_prefix(self.sys()).unwrap().components().count();
        let up = "../".repeat(depth);
        symlink(format!("{up}class/block"), dir.join("subsystem")).unwrap();
        fs::create_dir_all(self.sys().join("dev/block")).unwrap();
        symlink(dir, self.sys().join("dev/block").join(dev)).unwrap();
        let name = dir.file_name().unwrap();
        symlink(dir, self.sys().join("class/block").join(name)).unwrap();
    }

    /// A virtual block device (device-mapper) stacked on `lower`.
    pub fn add_holder(&self, lower: &Path, name: &str, dev: &str) {
        let top = self.sys().join("devices/virtual/block").join(name);
        self.make_block_dir(&top, dev);
        symlink(&top, lower.join("holders").join(name)).unwrap();
        symlink(lower, top.join("slaves").join(lower.file_name().unwrap())).unwrap();
    }

    /// A tty provided by the function, as 8250_pci makes: a directory below the
    /// function and `class/tty/<name>` linking to it, with a `device` link back.
    pub fn add_tty(&self, bdf: &str, name: &str) {
        let dir = self.dev_dir(bdf).join("tty").join(name);
        fs::create_dir_all(&dir).unwrap();
        symlink(self.dev_dir(bdf), dir.join("device")).unwrap();
        fs::create_dir_all(self.sys().join("class/tty")).unwrap();
        symlink(&dir, self.sys().join("class/tty").join(name)).unwrap();
    }

    /// A block device deep below the function, as a USB disk sits below its
    /// controller.
    pub fn add_usb_disk(&self, bdf: &str, name: &str, dev: &str) -> PathBuf {
        let b = self
            .dev_dir(bdf)
            .join("usb2/2-1/2-1.4/2-1.4:1.0/host0/target0:0:0/0:0:0:0/block")
            .join(name);
        self.make_block_dir(&b, dev);
        b
    }

    pub fn set_attr(&self, bdf: &str, attr: &str, value: &str) {
        fs::write(self.dev_dir(bdf).join(attr), value).unwrap();
    }

    pub fn set_mountinfo(&self, text: &str) {
        fs::write(self.mountinfo(), text).unwrap();
    }

    pub fn group_node(&self, group: u32) -> PathBuf {
        self.dev().join("vfio").join(group.to_string())
    }
}

/// Plays the kernel's part after each write the binder makes, and records the
/// writes (paths relative to the fake `sys/`) in order.
pub struct FakeKernel<'a> {
    pub fake: &'a FakeSysfs,
    pub writes: Vec<(String, String)>,
    /// The driver each function gets when probed without an override.
    pub native: HashMap<String, String>,
    /// Fault injection: drivers_probe binds nothing.
    pub probe_does_nothing: bool,
    /// Fault injection: vfio-pci binds but no /dev/vfio node appears.
    pub no_group_node: bool,
}

impl<'a> FakeKernel<'a> {
    pub fn new(fake: &'a FakeSysfs) -> Self {
        FakeKernel {
            fake,
            writes: Vec::new(),
            native: HashMap::new(),
            probe_does_nothing: false,
            no_group_node: false,
        }
    }

    fn probe(&self, bdf: &str) {
        if self.probe_does_nothing || self.fake.driver_of(bdf).is_some() {
            return;
        }
        let ovr = self.fake.driver_override_of(bdf).trim().to_string();
        let driver = if ovr.is_empty() || ovr == "(null)" {
            match self.native.get(bdf) {
                Some(d) => d.clone(),
                None => return,
            }
        } else {
            ovr
        };
        if !self
            .fake
            .sys()
            .join("bus/pci/drivers")
            .join(&driver)
            .is_dir()
        {
            return;
        }
        self.fake.link_driver(bdf, &driver);
        if driver == "vfio-pci" && !self.no_group_node {
            let group = fs::read_link(self.fake.dev_dir(bdf).join("iommu_group")).unwrap();
            let n = group.file_name().unwrap().to_string_lossy().into_owned();
            fs::write(self.fake.dev().join("vfio").join(n), "").unwrap();
        }
    }
}

impl KernelHook for FakeKernel<'_> {
    fn written(&mut self, path: &Path, value: &str) -> Result<(), VfioError> {
        let rel = path
            .strip_prefix(self.fake.sys())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.writes.push((rel.clone(), value.to_string()));
        if rel == "bus/pci/drivers_probe" {
            self.probe(value.trim());
        } else if rel.ends_with("/driver/unbind") {
            self.fake.unlink_driver(value.trim());
        } else if rel.ends_with("/driver_override") {
            // The kernel stores an empty (or newline-only) value as "not set".
            if value.trim().is_empty() {
                fs::write(path, "(null)\n").unwrap();
            }
        }
        Ok(())
    }

    fn node_appears(&mut self, path: &Path) -> bool {
        path.exists()
    }
}
