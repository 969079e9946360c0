//! The host side against a fake sysfs tree (see `support/`): enumeration, groups,
//! binding and refusals. A fake kernel plays Linux's part between the binder's
//! writes; fault-injection tests say so in their names.

mod support;

use std::fs;

use bulkhead_vfio::{
    bind_to_vfio_pci_with, group_members, group_viable, host_critical_reason, release_with,
    BindOptions, GroupMember, VfioError,
};
use support::{bdf, FakeKernel, FakeSysfs};

const EDU: &str = "0000:00:03.0";
const NIC: &str = "0000:00:04.0";
const NO_FORCE: BindOptions = BindOptions {
    force: false,
    boot_display: false,
};
const FORCE: BindOptions = BindOptions {
    force: true,
    boot_display: false,
};
/// A grant with `boot-display=take`.
const TAKE_DISPLAY: BindOptions = BindOptions {
    force: false,
    boot_display: true,
};

/// A q35-like machine: host bridge (group 0), `edu` (group 3, no driver),
/// a NIC bound to e1000e (group 4), with vfio-pci loaded.
fn q35() -> FakeSysfs {
    let fake = FakeSysfs::new(&[
        "vfio-pci",
        "e1000e",
        "pcieport",
        "pci-stub",
        "snd_hda_intel",
        "virtio-pci",
    ]);
    fake.add_function("0000:00:00.0", 0x8086, 0x29c0, 0x060000, Some(0), None);
    fake.add_function(EDU, 0x1234, 0x11e8, 0x00ff00, Some(3), None);
    fake.add_function(NIC, 0x8086, 0x10d3, 0x020000, Some(4), Some("e1000e"));
    fake
}

#[test]
fn fake_sysfs_enumerates_functions() {
    let fake = q35();
    let root = fake.root();
    assert!(root.has_iommu().unwrap());
    let all = root.functions().unwrap();
    let names: Vec<String> = all.iter().map(|f| f.bdf.to_string()).collect();
    assert_eq!(names, ["0000:00:00.0", EDU, NIC]);

    let edu = &all[1];
    assert_eq!(
        (edu.vendor, edu.device, edu.class),
        (0x1234, 0x11e8, 0x00ff00)
    );
    assert_eq!(edu.driver, None);
    assert_eq!(edu.driver_override, None);
    assert_eq!(edu.iommu_group, Some(3));
    assert_eq!(edu.reset_methods, ["flr", "bus"]);
    assert_eq!(edu.path, root.function_path(bdf(EDU)));

    let nic = &all[2];
    assert_eq!(nic.driver.as_deref(), Some("e1000e"));
    assert_eq!(nic.class_code(), 0x0200);
    assert_eq!(all[0].class_code(), 0x0600);
}

#[test]
fn fake_sysfs_reads_driver_override_and_missing_reset_method() {
    let fake = q35();
    fake.set_attr(EDU, "driver_override", "vfio-pci\n");
    fs::remove_file(fake.dev_dir(EDU).join("reset_method")).unwrap();
    let f = fake.root().function(bdf(EDU)).unwrap();
    assert_eq!(f.driver_override.as_deref(), Some("vfio-pci"));
    assert!(f.reset_methods.is_empty());
}

#[test]
fn fake_sysfs_missing_device_is_a_clear_error() {
    let fake = q35();
    let err = fake.root().function(bdf("0000:00:1f.7")).unwrap_err();
    assert!(
        matches!(&err, VfioError::DeviceMissing { bdf: b, .. } if b.to_string() == "0000:00:1f.7"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("0000:00:1f.7 does not exist"),
        "{err}"
    );

    let mut kernel = FakeKernel::new(&fake);
    let err = bind_to_vfio_pci_with(&fake.root(), bdf("0000:00:1f.7"), NO_FORCE, &mut kernel)
        .unwrap_err();
    assert!(matches!(err, VfioError::DeviceMissing { .. }), "{err:?}");
    assert!(kernel.writes.is_empty());
}

#[test]
fn fake_sysfs_malformed_attribute_is_an_error_not_a_panic() {
    let fake = q35();
    fake.set_attr(EDU, "vendor", "banana\n");
    let err = fake.root().function(bdf(EDU)).unwrap_err();
    assert!(matches!(err, VfioError::Malformed { .. }), "{err:?}");
    fake.set_attr(EDU, "vendor", "0x123456\n");
    assert!(fake.root().function(bdf(EDU)).is_err());
    fake.set_attr(EDU, "vendor", "0x+123\n");
    assert!(fake.root().function(bdf(EDU)).is_err());
}

#[test]
fn fake_sysfs_missing_iommu_is_reported_and_nothing_is_written() {
    let fake = FakeSysfs::new(&["vfio-pci", "e1000e"]);
    fake.add_function(EDU, 0x1234, 0x11e8, 0x00ff00, None, None);
    let root = fake.root();
    assert!(!root.has_iommu().unwrap());

    let mut kernel = FakeKernel::new(&fake);
    let err = bind_to_vfio_pci_with(&root, bdf(EDU), NO_FORCE, &mut kernel).unwrap_err();
    assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");
    assert!(err.to_string().contains("intel_iommu=on"), "{err}");
    assert!(kernel.writes.is_empty());
    assert_eq!(fake.driver_override_of(EDU), "(null)\n");

    let err = group_viable(&root, 3).unwrap_err();
    assert!(matches!(err, VfioError::NoIommu { .. }), "{err:?}");

    // No iommu_groups directory at all counts the same.
    fs::remove_dir(fake.sys().join("kernel/iommu_groups")).unwrap();
    assert!(!root.has_iommu().unwrap());
}

#[test]
fn fake_sysfs_function_without_group_is_refused() {
    let fake = q35();
    fake.add_function("0000:00:05.0", 0x1af4, 0x1041, 0x020000, None, None);
    let mut kernel = FakeKernel::new(&fake);
    let err = bind_to_vfio_pci_with(&fake.root(), bdf("0000:00:05.0"), NO_FORCE, &mut kernel)
        .unwrap_err();
    assert!(matches!(err, VfioError::NoGroup { .. }), "{err:?}");
    assert!(kernel.writes.is_empty());
}

#[test]
fn fake_sysfs_group_members_and_viable_groups() {
    let fake = q35();
    // Group 7: a bridge driven by pcieport, a function on pci-stub, one unbound,
    // one on vfio-pci. All allowed.
    fake.add_function(
        "0000:00:1c.0",
        0x8086,
        0x2940,
        0x060400,
        Some(7),
        Some("pcieport"),
    );
    fake.add_function(
        "0000:01:00.0",
        0x10de,
        0x1c82,
        0x030000,
        Some(7),
        Some("vfio-pci"),
    );
    fake.add_function(
        "0000:01:00.1",
        0x10de,
        0x0fb9,
        0x040300,
        Some(7),
        Some("pci-stub"),
    );
    fake.add_function("0000:01:00.2", 0x10de, 0x0fba, 0x0c0330, Some(7), None);
    let root = fake.root();

    let members = group_members(&root, 7).unwrap();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "0000:00:1c.0",
            "0000:01:00.0",
            "0000:01:00.1",
            "0000:01:00.2"
        ]
    );
    assert_eq!(members[0].driver.as_deref(), Some("pcieport"));
    assert_eq!(members[0].class, Some(0x060400));
    assert!(members.iter().all(|m| m.allows_passthrough()));
    group_viable(&root, 7).unwrap();

    // Unbound edu alone in group 3.
    group_viable(&root, 3).unwrap();

    let err = group_viable(&root, 99).unwrap_err();
    assert!(
        matches!(err, VfioError::GroupMissing { group: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn fake_sysfs_split_group_is_not_viable_and_names_the_offenders() {
    let fake = q35();
    // A GPU on vfio-pci shares group 5 with its audio function, still on the host
    // driver, and with a non-bridge function on pcieport (not allowed).
    fake.add_function(
        "0000:01:00.0",
        0x10de,
        0x1c82,
        0x030000,
        Some(5),
        Some("vfio-pci"),
    );
    fake.add_function(
        "0000:01:00.1",
        0x10de,
        0x0fb9,
        0x040300,
        Some(5),
        Some("snd_hda_intel"),
    );
    let err = group_viable(&fake.root(), 5).unwrap_err();
    match &err {
        VfioError::GroupNotViable { group, members } => {
            assert_eq!(*group, 5);
            assert_eq!(
                members,
                &[GroupMember {
                    name: "0000:01:00.1".into(),
                    driver: Some("snd_hda_intel".into()),
                }]
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .contains("0000:01:00.1 is bound to snd_hda_intel"),
        "{err}"
    );

    // Group 4 holds the NIC on its host driver.
    let err = group_viable(&fake.root(), 4).unwrap_err();
    assert!(
        err.to_string().contains("0000:00:04.0 is bound to e1000e"),
        "{err}"
    );
}

#[test]
fn fake_sysfs_bind_sequence_writes_the_right_files_in_order() {
    let fake = q35();
    let mut kernel = FakeKernel::new(&fake);
    let report = bind_to_vfio_pci_with(&fake.root(), bdf(NIC), NO_FORCE, &mut kernel).unwrap();
    assert_eq!(report.group, 4);
    assert!(report.changed);
    assert_eq!(report.previous_driver.as_deref(), Some("e1000e"));
    assert_eq!(
        kernel.writes,
        [
            (
                format!("bus/pci/devices/{NIC}/driver_override"),
                "vfio-pci".to_string()
            ),
            (
                format!("bus/pci/devices/{NIC}/driver/unbind"),
                NIC.to_string()
            ),
            ("bus/pci/drivers_probe".to_string(), NIC.to_string()),
        ]
    );
    // The files hold what was written: the unbind went to e1000e's unbind file.
    assert_eq!(fake.driver_override_of(NIC), "vfio-pci");
    let unbind = fs::read_to_string(fake.sys().join("bus/pci/drivers/e1000e/unbind")).unwrap();
    assert_eq!(unbind, NIC);
    assert_eq!(fake.driver_of(NIC).as_deref(), Some("vfio-pci"));
    assert!(fake.group_node(4).exists());
    group_viable(&fake.root(), 4).unwrap();
}

#[test]
fn fake_sysfs_bind_of_an_unbound_function_skips_unbind() {
    let fake = q35();
    let mut kernel = FakeKernel::new(&fake);
    let report = bind_to_vfio_pci_with(&fake.root(), bdf(EDU), NO_FORCE, &mut kernel).unwrap();
    assert_eq!((report.group, report.changed), (3, true));
    assert_eq!(report.previous_driver, None);
    let paths: Vec<&str> = kernel.writes.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("bus/pci/devices/{EDU}/driver_override").as_str(),
            "bus/pci/drivers_probe"
        ]
    );
    assert_eq!(fake.driver_of(EDU).as_deref(), Some("vfio-pci"));
}

#[test]
fn fake_sysfs_already_bound_is_idempotent() {
    let fake = q35();
    let root = fake.root();
    let mut kernel = FakeKernel::new(&fake);
    bind_to_vfio_pci_with(&root, bdf(EDU), NO_FORCE, &mut kernel).unwrap();

    let mut again = FakeKernel::new(&fake);
    let report = bind_to_vfio_pci_with(&root, bdf(EDU), NO_FORCE, &mut again).unwrap();
    assert!(!report.changed);
    assert_eq!(report.group, 3);
    assert!(again.writes.is_empty());

    // Bound to vfio-pci some other way (no override): only the override is set.
    fake.add_function(
        "0000:00:06.0",
        0x1234,
        0x11e8,
        0x00ff00,
        Some(6),
        Some("vfio-pci"),
    );
    fs::write(fake.group_node(6), "").unwrap();
    let mut third = FakeKernel::new(&fake);
    let report = bind_to_vfio_pci_with(&root, bdf("0000:00:06.0"), NO_FORCE, &mut third).unwrap();
    assert!(report.changed);
    assert_eq!(third.writes.len(), 1);
    assert_eq!(fake.driver_of("0000:00:06.0").as_deref(), Some("vfio-pci"));
}

#[test]
fn fake_sysfs_vfio_pci_not_loaded_is_refused_before_any_write() {
    let fake = FakeSysfs::new(&["e1000e"]);
    fake.add_function(NIC, 0x8086, 0x10d3, 0x020000, Some(4), Some("e1000e"));
    let mut kernel = FakeKernel::new(&fake);
    let err = bind_to_vfio_pci_with(&fake.root(), bdf(NIC), NO_FORCE, &mut kernel).unwrap_err();
    assert!(matches!(err, VfioError::VfioPciMissing { .. }), "{err:?}");
    assert!(kernel.writes.is_empty());
    assert_eq!(fake.driver_of(NIC).as_deref(), Some("e1000e"));
}

#[test]
fn fake_sysfs_fault_injected_probe_that_binds_nothing_leaves_the_device_unbound() {
    let fake = q35();
    let mut kernel = FakeKernel::new(&fake);
    kernel.probe_does_nothing = true;
    let err = bind_to_vfio_pci_with(&fake.root(), bdf(NIC), NO_FORCE, &mut kernel).unwrap_err();
    assert!(matches!(err, VfioError::BindFailed { .. }), "{err:?}");
    assert!(
        err.to_string().contains("no driver instead of vfio-pci"),
        "{err}"
    );
    // Not handed back to the host driver.
    assert_eq!(fake.driver_of(NIC), None);
}

#[test]
fn fake_sysfs_fault_injected_missing_group_node_is_an_error() {
    let fake = q35();
    let mut kernel = FakeKernel::new(&fake);
    kernel.no_group_node = true;
    let err = bind_to_vfio_pci_with(&fake.root(), bdf(EDU), NO_FORCE, &mut kernel).unwrap_err();
    assert!(matches!(err, VfioError::BindFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("vfio/3 did not appear"), "{err}");
}

fn assert_refused(fake: &FakeSysfs, addr: &str, options: BindOptions, needle: &str) {
    let mut kernel = FakeKernel::new(fake);
    let err = bind_to_vfio_pci_with(&fake.root(), bdf(addr), options, &mut kernel).unwrap_err();
    match &err {
        VfioError::HostCritical { reason, .. } => {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}")
        }
        other => panic!("{addr}: expected HostCritical, got {other:?}"),
    }
    assert!(
        kernel.writes.is_empty(),
        "{addr}: wrote {:?}",
        kernel.writes
    );
}

#[test]
fn fake_sysfs_host_bridge_and_bridges_are_refused_even_with_force() {
    let fake = q35();
    fake.add_function(
        "0000:00:1c.0",
        0x8086,
        0x2940,
        0x060400,
        Some(7),
        Some("pcieport"),
    );
    assert_refused(&fake, "0000:00:00.0", FORCE, "host bridge");
    assert_refused(&fake, "0000:00:1c.0", FORCE, "bridge (class 0x0604)");
}

#[test]
fn fake_sysfs_function_holding_a_mounted_filesystem_is_refused_even_with_force() {
    let fake = q35();
    let disk = "0000:00:02.0";
    fake.add_function(disk, 0x1af4, 0x1042, 0x018000, Some(2), Some("virtio-pci"));
    let vda = fake.add_block_device(disk, "vda", "254:0");

    // Not mounted: allowed (dry check, no bind).
    let root = fake.root();
    let func = root.function(bdf(disk)).unwrap();
    assert_eq!(host_critical_reason(&root, &func, false).unwrap(), None);

    // The whole disk mounted as /.
    fake.set_mountinfo("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n");
    assert_refused(
        &fake,
        disk,
        FORCE,
        "block device vda, on which / is mounted (/dev/vda 254:0)",
    );

    // A partition mounted at /boot.
    fake.make_block_dir(&vda.join("vda1"), "254:1");
    fake.set_mountinfo(
        "22 27 0:21 / /proc rw - proc proc rw\n31 27 254:1 / /boot rw - ext4 /dev/vda1 rw\n",
    );
    assert_refused(&fake, disk, FORCE, "vda1, on which /boot is mounted");

    // A device-mapper volume stacked on a partition.
    fake.make_block_dir(&vda.join("vda2"), "254:2");
    fake.add_holder(&vda.join("vda2"), "dm-0", "253:0");
    fake.set_mountinfo("40 27 253:0 / /home rw - xfs /dev/mapper/vg-home rw\n");
    assert_refused(
        &fake,
        disk,
        FORCE,
        "vda2, on which /home is mounted (/dev/mapper/vg-home 253:0)",
    );

    // btrfs reports an anonymous device number: matched by source.
    fake.set_mountinfo("41 27 0:45 / /data rw - btrfs /dev/vda2 rw\n");
    assert_refused(&fake, disk, FORCE, "on which /data is mounted");

    // A USB disk ten levels below its controller.
    let xhci = "0000:00:14.0";
    fake.add_driver("xhci_hcd");
    fake.add_function(xhci, 0x8086, 0xa36d, 0x0c0330, Some(12), Some("xhci_hcd"));
    let sda = fake.add_usb_disk(xhci, "sda", "8:0");
    fake.make_block_dir(&sda.join("sda1"), "8:1");
    let root = fake.root();
    let func = root.function(bdf(xhci)).unwrap();
    assert_eq!(host_critical_reason(&root, &func, false).unwrap(), None);
    fake.set_mountinfo("50 27 8:1 / /media/usb rw - vfat /dev/sda1 rw\n");
    assert_refused(&fake, xhci, FORCE, "sda1, on which /media/usb is mounted");
    // That mount does not make the virtio disk critical, and the virtio disk's mount
    // does not make the USB controller critical.
    let virtio = root.function(bdf(disk)).unwrap();
    assert_eq!(host_critical_reason(&root, &virtio, false).unwrap(), None);
    fake.set_mountinfo("40 27 253:0 / /home rw - xfs /dev/mapper/vg-home rw\n");
    assert_eq!(host_critical_reason(&root, &func, false).unwrap(), None);
}

#[test]
fn fake_sysfs_unmounted_disk_can_be_bound() {
    let fake = q35();
    let disk = "0000:00:02.0";
    fake.add_function(disk, 0x1af4, 0x1042, 0x018000, Some(2), Some("virtio-pci"));
    fake.add_block_device(disk, "vdb", "254:16");
    fake.set_mountinfo("27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n");
    let mut kernel = FakeKernel::new(&fake);
    let report = bind_to_vfio_pci_with(&fake.root(), bdf(disk), NO_FORCE, &mut kernel).unwrap();
    assert_eq!(report.previous_driver.as_deref(), Some("virtio-pci"));
}

#[test]
fn fake_sysfs_console_devices_are_refused_without_force() {
    let fake = q35();
    fake.add_driver("serial");
    fake.add_driver("bochs-drm");
    // A PCI serial card whose port is the console.
    let uart = "0000:00:07.0";
    fake.add_function(uart, 0x1b36, 0x0002, 0x070002, Some(8), Some("serial"));
    fake.add_tty(uart, "ttyS0");
    assert_refused(&fake, uart, NO_FORCE, "ttyS0, a tty behind /dev/console");

    // A serial controller bound to a driver, not the console: still refused.
    let uart2 = "0000:00:08.0";
    fake.add_function(uart2, 0x1b36, 0x0002, 0x070002, Some(9), Some("serial"));
    fake.add_tty(uart2, "ttyS4");
    assert_refused(&fake, uart2, NO_FORCE, "communication (serial) controller");

    // A display controller bound to a host driver.
    let vga = "0000:00:09.0";
    fake.add_function(vga, 0x1234, 0x1111, 0x030000, Some(10), Some("bochs-drm"));
    assert_refused(&fake, vga, NO_FORCE, "display controller (class 0x0300)");

    // The boot VGA device with no driver (firmware framebuffer).
    let efifb = "0000:00:0a.0";
    fake.add_function(efifb, 0x1234, 0x1111, 0x030000, Some(11), None);
    fake.set_attr(efifb, "boot_vga", "1\n");
    assert_refused(&fake, efifb, NO_FORCE, "boot VGA");

    // boot-display=take takes display controllers only: the serial console stays refused.
    assert_refused(
        &fake,
        uart2,
        TAKE_DISPLAY,
        "communication (serial) controller",
    );
    for addr in [vga, efifb] {
        let mut kernel = FakeKernel::new(&fake);
        let report =
            bind_to_vfio_pci_with(&fake.root(), bdf(addr), TAKE_DISPLAY, &mut kernel).unwrap();
        assert!(report.changed, "{addr}");
        assert_eq!(fake.driver_of(addr).as_deref(), Some("vfio-pci"));
        release_with(&fake.root(), bdf(addr), &mut kernel).unwrap();
    }

    // force overrides these heuristics.
    for addr in [uart, vga, efifb] {
        let mut kernel = FakeKernel::new(&fake);
        let report = bind_to_vfio_pci_with(&fake.root(), bdf(addr), FORCE, &mut kernel).unwrap();
        assert!(report.changed, "{addr}");
        assert_eq!(fake.driver_of(addr).as_deref(), Some("vfio-pci"));
    }
}

#[test]
fn fake_sysfs_release_hands_the_function_back_only_when_asked() {
    let fake = q35();
    let root = fake.root();
    let mut kernel = FakeKernel::new(&fake);
    kernel.native.insert(NIC.to_string(), "e1000e".to_string());
    bind_to_vfio_pci_with(&root, bdf(NIC), NO_FORCE, &mut kernel).unwrap();
    assert_eq!(fake.driver_of(NIC).as_deref(), Some("vfio-pci"));

    // A later probe of the same function keeps it on vfio-pci (driver_override).
    fake.unlink_driver(NIC);
    kernel.writes.clear();
    bind_to_vfio_pci_with(&root, bdf(NIC), NO_FORCE, &mut kernel).unwrap();
    assert_eq!(fake.driver_of(NIC).as_deref(), Some("vfio-pci"));

    kernel.writes.clear();
    let report = release_with(&root, bdf(NIC), &mut kernel).unwrap();
    assert!(report.was_bound);
    assert_eq!(report.new_driver.as_deref(), Some("e1000e"));
    assert_eq!(
        kernel.writes,
        [
            (
                format!("bus/pci/devices/{NIC}/driver_override"),
                "\n".to_string()
            ),
            (
                format!("bus/pci/devices/{NIC}/driver/unbind"),
                NIC.to_string()
            ),
            ("bus/pci/drivers_probe".to_string(), NIC.to_string()),
        ]
    );
    let unbind = fs::read_to_string(fake.sys().join("bus/pci/drivers/vfio-pci/unbind")).unwrap();
    assert_eq!(unbind, NIC);
    assert_eq!(fake.driver_override_of(NIC), "(null)\n");
}
