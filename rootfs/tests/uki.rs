//! The unified kernel image `build --efi` writes, from the real parts: Debian's systemd-stub
//! and kernel as `provision` fetched them into the cache, an initramfs-sized payload and a
//! command line; then the EFI system partition that carries it. Needs
//! `bulkhead-rootfs provision`. (That firmware boots it: tests/tests/efi_e2e.rs.)

use bulkhead_rootfs::efi::esp::{read_file, write_esp, REMOVABLE_PATH};
use bulkhead_rootfs::efi::{self, stub, uki};
use bulkhead_rootfs::kernel::{Cache, Kernel};

#[test]
fn the_uki_holds_the_stub_and_each_part_byte_for_byte_at_aligned_addresses() {
    let cache = Cache::default_location();
    let kernel = Kernel::current(&cache).unwrap_or_else(|e| panic!("{e}"));
    let stub_path = stub::in_cache(&cache).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any alignment, so padding and sizes are told apart.
    let initrd: Vec<u8> = (0..5_000_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let initrd_path = dir.path().join("host.cpio.gz");
    std::fs::write(&initrd_path, &initrd).unwrap();
    let cmdline = "console=ttyS0 panic=-1 intel_iommu=on bulkhead.loglevel=debug";
    let out = dir.path().join("out/bulkhead.efi");
    let layout = efi::host_uki(&cache, &kernel, &initrd_path, cmdline, "demo", &out)
        .unwrap_or_else(|e| panic!("{e}"));

    let data = std::fs::read(&out).unwrap();
    let reread = uki::PeLayout::parse(&data).unwrap();
    assert_eq!(reread, layout, "build returns the written layout");
    assert!(
        layout.problems(&uki::SECTIONS).is_empty(),
        "{:?}",
        layout.problems(&uki::SECTIONS)
    );

    let kernel_bytes = std::fs::read(&kernel.vmlinuz).unwrap();
    let contents = |name| {
        layout
            .contents(&data, name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", layout.sections))
    };
    assert!(
        contents(".linux") == kernel_bytes.as_slice(),
        ".linux is the kernel"
    );
    assert!(
        contents(".initrd") == initrd.as_slice(),
        ".initrd is the initramfs"
    );
    assert_eq!(contents(".cmdline"), cmdline.as_bytes());
    let osrel = String::from_utf8(contents(".osrel").to_vec()).unwrap();
    assert!(osrel.contains("ID=bulkhead\n"), "{osrel}");
    assert!(osrel.contains(&kernel.abi), "{osrel}");

    for name in uki::SECTIONS {
        let s = layout.section(name).unwrap();
        assert_eq!(u64::from(s.rva) % 4096, 0, "{name} at {:#x}", s.rva);
        assert_eq!(
            s.file_offset % layout.file_alignment,
            0,
            "{name}'s data at {:#x}",
            s.file_offset
        );
    }
    // The kernel comes last and the image's size covers it.
    let last = layout.sections.iter().max_by_key(|s| s.rva).unwrap();
    assert_eq!(last.name, ".linux");
    assert!(u64::from(layout.size_of_image) >= u64::from(last.rva) + kernel_bytes.len() as u64);

    // The stub is all there, unchanged, ahead of the added sections.
    let stub_data = std::fs::read(&stub_path).unwrap();
    let stub_layout = uki::PeLayout::parse(&stub_data).unwrap();
    assert!(stub_layout.section(".text").is_some() && stub_layout.section(".sbat").is_some());
    let first_added = layout.section(".osrel").unwrap().rva;
    for s in &stub_layout.sections {
        assert_eq!(
            layout.contents(&data, &s.name),
            stub_layout.contents(&stub_data, &s.name),
            "the stub's {} section",
            s.name
        );
        assert_eq!(layout.section(&s.name).map(|n| n.rva), Some(s.rva));
        assert!(s.rva < first_added);
    }
    assert_eq!(
        layout.sections.len(),
        stub_layout.sections.len() + uki::SECTIONS.len()
    );

    // The EFI system partition carries it at the path firmware starts without a boot entry.
    let esp = dir.path().join("esp.img");
    write_esp(&out, &esp).unwrap_or_else(|e| panic!("{e}"));
    assert!(read_file(&esp, REMOVABLE_PATH).unwrap() == data);
}

#[test]
fn a_stub_that_is_already_a_uki_is_refused() {
    let cache = Cache::default_location();
    let kernel = Kernel::current(&cache).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("i");
    std::fs::write(&initrd, b"x").unwrap();
    let once = dir.path().join("once.efi");
    efi::host_uki(&cache, &kernel, &initrd, "quiet", "t", &once).unwrap();
    let os_release = uki::os_release("t", &kernel.abi);
    let again = uki::build(
        &uki::UkiInput {
            stub: &once,
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            cmdline: "quiet",
            os_release: &os_release,
        },
        &dir.path().join("twice.efi"),
    );
    match again {
        Err(efi::EfiError::SectionTaken { section, .. }) => assert_eq!(section, ".osrel"),
        other => panic!("expected SectionTaken, got {other:?}"),
    }
    assert!(!dir.path().join("twice.efi").exists());
    // And a file that is no PE image at all.
    let bad = uki::build(
        &uki::UkiInput {
            stub: &initrd,
            kernel: &kernel.vmlinuz,
            initrd: &initrd,
            cmdline: "quiet",
            os_release: &os_release,
        },
        &dir.path().join("bad.efi"),
    );
    assert!(matches!(bad, Err(efi::EfiError::NotPe { .. })), "{bad:?}");
}
