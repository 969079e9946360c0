//! Module closures computed from the provisioned Debian cloud kernel's own `.modinfo`
//! sections (needs `bulkhead-rootfs provision`).

use bulkhead_rootfs::kernel::{Cache, Kernel};
use bulkhead_rootfs::modules::{modules_dep, ModuleIndex};

fn index() -> ModuleIndex {
    let k = Kernel::current(&Cache::default_location()).unwrap_or_else(|e| panic!("{e}"));
    ModuleIndex::scan(&k.modules_dir).expect("scan modules")
}

#[test]
fn kvm_amd_and_vfio_pci_bring_their_dependencies_in_load_order() {
    let idx = index();
    let chosen = idx
        .closure(&["kvm-amd".into(), "vfio-pci".into()])
        .expect("closure");
    let names: Vec<&str> = chosen.iter().map(|m| m.name.as_str()).collect();
    for need in [
        "irqbypass",
        "kvm",
        "kvm_amd",
        "vfio",
        "vfio_pci_core",
        "vfio_pci",
        "vfio_iommu_type1",
    ] {
        assert!(names.contains(&need), "{need} missing from {names:?}");
    }
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(
        pos("irqbypass") < pos("kvm") && pos("kvm") < pos("kvm_amd"),
        "{names:?}"
    );
    assert!(pos("vfio") < pos("vfio_pci_core") && pos("vfio_pci_core") < pos("vfio_pci"));
    // PowerPC's soft dependency of vfio does not exist on x86 and is skipped.
    assert!(!names.contains(&"vfio_iommu_spapr_tce"));
    let dep = modules_dep(&chosen);
    let kvm_amd_line = dep
        .lines()
        .find(|l| l.contains("kvm-amd.ko:"))
        .expect("kvm-amd line");
    assert!(
        kvm_amd_line.ends_with("kvm.ko kernel/virt/lib/irqbypass.ko"),
        "{kvm_amd_line}"
    );
}

#[test]
fn a_module_the_kernel_lacks_is_a_clear_error() {
    let err = index().closure(&["no-such-module".into()]).unwrap_err();
    assert!(
        err.to_string().contains("\"no_such_module\" is not in"),
        "{err}"
    );
}

#[test]
fn builtin_modules_need_no_file() {
    // The 8250 serial driver is built into the cloud kernel.
    let idx = index();
    assert!(idx.is_builtin("8250"));
    assert!(idx.closure(&["8250".into()]).expect("closure").is_empty());
}

#[test]
fn virtio_wl_module_builds_against_the_debian_headers_for_device_63() {
    let k = Kernel::current(&Cache::default_location()).unwrap_or_else(|e| panic!("{e}"));
    let ko = bulkhead_rootfs::kmod::build(&bulkhead_rootfs::workspace_dir(), "virtio_wl", &k.abi)
        .unwrap_or_else(|e| panic!("{e}"));
    let raw = std::fs::read(&ko).expect("read the .ko");
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("alias=virtio:d0000003Fv*"),
        "module alias for virtio device 63"
    );
    assert!(
        text.contains(&format!(
            "vermagic={} ",
            k.abi.trim_end_matches("-cloud-amd64")
        )) || text.contains("vermagic=6."),
        "built for the kernel"
    );
    let info = bulkhead_rootfs::modules::read_modinfo(&ko).expect("modinfo");
    assert_eq!(info.name.as_deref(), Some("virtio_wl"));
    // The closure pulls its virtio dependencies from the Debian tree.
    let mut idx = index();
    idx.add_external("virtio_wl", ko);
    let names: Vec<String> = idx
        .closure(&["virtio_wl".into()])
        .expect("closure")
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names.last().map(String::as_str), Some("virtio_wl"));
    assert!(names.iter().any(|n| n == "virtio_ring"), "{names:?}");
}
