//! Read-only checks against this machine's real `/sys` and `/proc/self/mountinfo`.
//! Nothing here writes to sysfs: binding is only attempted when the kernel has no
//! IOMMU, where the binder refuses before its first write.

use std::fs;
use std::path::Path;

use bulkhead_vfio::{
    bind_to_vfio_pci, host_critical_reason, Bdf, BindOptions, SysfsRoot, VfioError,
};

#[test]
fn real_sysfs_enumeration_parses_every_function() {
    let root = SysfsRoot::host();
    let funcs = root.functions().unwrap();
    let listed = match fs::read_dir("/sys/bus/pci/devices") {
        Ok(d) => d.count(),
        Err(_) => 0,
    };
    assert_eq!(funcs.len(), listed);
    for f in &funcs {
        let raw = fs::read_to_string(f.path.join("vendor")).unwrap();
        assert_eq!(format!("{:#06x}", f.vendor), raw.trim(), "{}", f.bdf);
        let name = f.path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(f.bdf.to_string(), name);
        let linked = fs::read_link(f.path.join("driver"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
        assert_eq!(f.driver, linked, "{}", f.bdf);
    }
}

/// The PCI function that the root filesystem's block device sits under, found a
/// different way from the crate (through `/sys/dev/block/<major:minor>`).
fn root_disk_function() -> Option<(Bdf, String)> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dev = mountinfo.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&"/")).then(|| f.get(2).map(|s| s.to_string()))?
    })?;
    let real = fs::canonicalize(Path::new("/sys/dev/block").join(&dev)).ok()?;
    let bdf = real
        .components()
        .rev()
        .find_map(|c| c.as_os_str().to_str()?.parse::<Bdf>().ok())?;
    Some((bdf, dev))
}

#[test]
fn real_sysfs_function_holding_the_root_filesystem_is_host_critical() {
    let Some((bdf, dev)) = root_disk_function() else {
        panic!(
            "this test needs a machine whose root filesystem is on a PCI block device (the \
             build machines' /dev/vda is); here it is not, so the host-critical check cannot \
             be exercised"
        );
    };
    let root = SysfsRoot::host();
    let func = root.function(bdf).unwrap();
    let reason = host_critical_reason(&root, &func, true).unwrap();
    let reason = reason.unwrap_or_else(|| panic!("{bdf} holds / ({dev}) but was not refused"));
    assert!(reason.contains("on which"), "{reason}");
    eprintln!("{bdf}: {reason}");
}

#[test]
fn real_sysfs_without_iommu_bind_refuses_before_writing() {
    let root = SysfsRoot::host();
    assert!(
        !root.has_iommu().unwrap(),
        "this test needs a build machine whose kernel has no IOMMU (the build machines' has \
         none): with one, a real bind could go through, and this test never writes to sysfs"
    );
    let Some(func) = root.functions().unwrap().into_iter().next() else {
        panic!("this test needs at least one PCI function in /sys/bus/pci/devices; there is none");
    };
    let before = fs::read_to_string(func.path.join("driver_override")).ok();
    let err = bind_to_vfio_pci(&root, func.bdf, BindOptions::default()).unwrap_err();
    assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");
    assert_eq!(
        fs::read_to_string(func.path.join("driver_override")).ok(),
        before
    );
}
