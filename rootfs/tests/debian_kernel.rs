//! Module closures and our out-of-tree module, on each kernel `provision` fetches: the
//! default (Debian's cloud kernel of the build machine's suite: 6.1 on Debian 12, plain
//! `.ko` modules) and the second (its backports: the 6.12 line on Debian 12, `.ko.xz`
//! modules, more built in). Needs `bulkhead-rootfs provision`.

use bulkhead_rootfs::kernel::{Cache, Kernel, KernelChoice};
use bulkhead_rootfs::modules::{modules_dep, read_modinfo, read_module, ModuleIndex};

/// Both provisioned kernels (the test fails, naming the command, if one is missing).
fn kernels() -> Vec<Kernel> {
    [KernelChoice::default(), KernelChoice::second()]
        .iter()
        .map(|c| {
            Kernel::chosen(&Cache::default_location(), c).unwrap_or_else(|e| panic!("{c}: {e}"))
        })
        .collect()
}

fn index(k: &Kernel) -> ModuleIndex {
    ModuleIndex::scan(&k.modules_dir).unwrap_or_else(|e| panic!("scan {}: {e}", k.abi))
}

#[test]
fn kvm_amd_and_vfio_pci_bring_their_dependencies_in_load_order() {
    for k in kernels() {
        let idx = index(&k);
        let chosen = idx
            .closure(&["kvm-amd".into(), "vfio-pci".into()])
            .unwrap_or_else(|e| panic!("{}: {e}", k.abi));
        let names: Vec<&str> = chosen.iter().map(|m| m.name.as_str()).collect();
        for need in ["kvm", "kvm_amd", "vfio", "vfio_pci_core", "vfio_pci"] {
            assert!(
                names.contains(&need),
                "{}: {need} missing from {names:?}",
                k.abi
            );
        }
        // Modules or built in: each is in the image or in the kernel, never neither.
        for maybe_builtin in ["irqbypass", "vfio_iommu_type1"] {
            assert!(
                names.contains(&maybe_builtin) != idx.is_builtin(maybe_builtin),
                "{}: {maybe_builtin} in {names:?}, built in: {}",
                k.abi,
                idx.is_builtin(maybe_builtin)
            );
        }
        let pos = |n: &str| names.iter().position(|x| *x == n);
        assert!(pos("kvm") < pos("kvm_amd"), "{}: {names:?}", k.abi);
        if !idx.is_builtin("irqbypass") {
            assert!(pos("irqbypass") < pos("kvm"), "{}: {names:?}", k.abi);
        }
        assert!(pos("vfio") < pos("vfio_pci_core") && pos("vfio_pci_core") < pos("vfio_pci"));
        // PowerPC's soft dependency of vfio does not exist on x86 and is skipped.
        assert!(!names.contains(&"vfio_iommu_spapr_tce"));
        // Images name every module as a plain `.ko`, whatever the kernel ships, and the
        // contents read through the compression are the module itself.
        let dep = modules_dep(&chosen);
        let kvm_amd_line = dep
            .lines()
            .find(|l| l.contains("/kvm-amd.ko:"))
            .unwrap_or_else(|| panic!("{}: no kvm-amd line in\n{dep}", k.abi));
        assert!(kvm_amd_line.contains("/kvm.ko"), "{kvm_amd_line}");
        for m in &chosen {
            assert!(m.rel_path.ends_with(".ko"), "{}", m.rel_path);
            let data = read_module(&m.source).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                data.get(..4),
                Some(&b"\x7fELF"[..]),
                "{}",
                m.source.display()
            );
            let info = read_modinfo(&m.source).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(info.name.as_deref(), Some(m.name.as_str()));
        }
    }
}

#[test]
fn the_second_kernel_is_another_kernel_with_compressed_modules_where_it_ships_them() {
    let [first, second] = <[Kernel; 2]>::try_from(kernels()).expect("two kernels");
    assert_ne!(first.abi, second.abi, "provision fetched one kernel twice");
    // Whatever the second kernel ships compressed is chosen from its compressed files.
    let idx = index(&second);
    let chosen = idx.closure(&["kvm-amd".into()]).expect("closure");
    let shipped_compressed = idx.rel_path("kvm_amd").is_some_and(|p| !p.ends_with(".ko"));
    let read_compressed = chosen
        .iter()
        .any(|m| !m.source.to_string_lossy().ends_with(".ko"));
    assert_eq!(shipped_compressed, read_compressed, "{chosen:?}");
}

#[test]
fn a_module_the_kernel_lacks_is_a_clear_error() {
    for k in kernels() {
        let err = index(&k).closure(&["no-such-module".into()]).unwrap_err();
        assert!(
            err.to_string().contains("\"no_such_module\" is not in"),
            "{err}"
        );
    }
}

#[test]
fn builtin_modules_need_no_file() {
    for k in kernels() {
        // The 8250 serial driver is built into the cloud kernels.
        let idx = index(&k);
        assert!(idx.is_builtin("8250"), "{}", k.abi);
        assert!(idx.closure(&["8250".into()]).expect("closure").is_empty());
    }
}

#[test]
fn virtio_wl_module_builds_against_each_kernels_unpacked_headers_for_device_63() {
    for k in kernels() {
        let ko = bulkhead_rootfs::kmod::build(&bulkhead_rootfs::workspace_dir(), "virtio_wl", &k)
            .unwrap_or_else(|e| panic!("{}: {e}", k.abi));
        assert!(
            k.headers_dir.starts_with(Cache::default_location().dir()),
            "headers from the cache, not the build machine: {}",
            k.headers_dir.display()
        );
        let raw = std::fs::read(&ko).expect("read the .ko");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.contains("alias=virtio:d0000003Fv*"),
            "module alias for virtio device 63"
        );
        let info = read_modinfo(&ko).expect("modinfo");
        assert_eq!(info.name.as_deref(), Some("virtio_wl"));
        // The kernel loads only modules built for its own release and options: the same
        // vermagic as its own modules.
        let mut idx = index(&k);
        let virtio = idx.rel_path("virtio_blk").expect("virtio_blk").to_string();
        let theirs = read_modinfo(&k.modules_dir.join(virtio)).expect("modinfo");
        assert!(info.vermagic.as_deref().unwrap_or("").starts_with(&k.abi));
        assert_eq!(info.vermagic, theirs.vermagic, "{}", k.abi);
        // The closure pulls its virtio dependencies from the Debian tree; virtio_ring is a
        // module in some kernels (6.1) and built into others (6.12).
        idx.add_external("virtio_wl", ko);
        let names: Vec<String> = idx
            .closure(&["virtio_wl".into()])
            .expect("closure")
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names.last().map(String::as_str), Some("virtio_wl"));
        let ring_in_image = names.iter().any(|n| n == "virtio_ring");
        assert!(
            ring_in_image != idx.is_builtin("virtio_ring"),
            "{}: virtio_ring in {names:?}, built in: {}",
            k.abi,
            idx.is_builtin("virtio_ring")
        );
    }
}
