//! A unified kernel image (UKI): Debian's systemd-stub with the kernel, the initramfs, the
//! kernel command line and an os-release added as PE sections, one EFI executable that
//! firmware starts directly.
//!
//! The stub (systemd 252 on Debian 12) finds its payload by section name: `.linux` (the
//! bzImage, started through the kernel's EFI handover entry), `.initrd`, `.cmdline` (used
//! as the command line; under Secure Boot nothing else can override it) and `.osrel` (what
//! boot menus show). Each section must lie at its own virtual address after the stub's last
//! section, aligned to the image's section alignment; we use whole 4 KiB pages (a multiple
//! of the stub's 512-byte `SectionAlignment`), in the order of systemd's `ukify`: the
//! kernel last.
//!
//! The sections are written by binutils' `objcopy` (`--add-section`,
//! `--change-section-vma`), the method systemd-stub's own documentation gives for Debian
//! 12's version: it rewrites the PE headers (`SizeOfImage`, the section table, the code and
//! data sizes) of an existing image consistently, which the `object` crate does not offer
//! (its PE support reads images, and writes only new ones). We compute the addresses from
//! the stub's own headers (read with `object`) and check the result with the same reader.

use std::path::{Path, PathBuf};
use std::process::Command;

use object::pe::{ImageDosHeader, ImageNtHeaders64};
use object::read::pe::{ImageNtHeaders, ImageOptionalHeader};
use object::LittleEndian as LE;

use super::{io, EfiError};

/// The sections a UKI gets, in the order they are placed.
pub const SECTIONS: [&str; 4] = [".osrel", ".cmdline", ".initrd", ".linux"];

/// The alignment of the added sections' virtual addresses (at least the image's own).
pub const PAGE: u64 = 4096;

/// One section of a PE image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeSection {
    pub name: String,
    /// Relative virtual address.
    pub rva: u32,
    pub virtual_size: u32,
    /// Offset of its data in the file, and the data's (file-aligned) size there.
    pub file_offset: u32,
    pub raw_size: u32,
}

/// What a PE32+ image's headers say about its layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeLayout {
    pub image_base: u64,
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub sections: Vec<PeSection>,
}

impl PeLayout {
    /// Reads the headers of a PE32+ image.
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let dos = ImageDosHeader::parse(data).map_err(|e| e.to_string())?;
        let mut offset = dos.nt_headers_offset().into();
        let (nt, _dirs) = ImageNtHeaders64::parse(data, &mut offset).map_err(|e| e.to_string())?;
        let opt = nt.optional_header();
        let table = nt.sections(data, offset).map_err(|e| e.to_string())?;
        let sections = table
            .iter()
            .map(|s| PeSection {
                name: String::from_utf8_lossy(s.raw_name()).into_owned(),
                rva: s.virtual_address.get(LE),
                virtual_size: s.virtual_size.get(LE),
                file_offset: s.pointer_to_raw_data.get(LE),
                raw_size: s.size_of_raw_data.get(LE),
            })
            .collect();
        Ok(Self {
            image_base: opt.image_base(),
            section_alignment: opt.section_alignment(),
            file_alignment: opt.file_alignment(),
            size_of_image: opt.size_of_image(),
            sections,
        })
    }

    pub fn section(&self, name: &str) -> Option<&PeSection> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// A section's contents as loaded: its first `virtual_size` bytes in the file (the rest
    /// of its raw data is file-alignment padding).
    pub fn contents<'a>(&self, data: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let s = self.section(name)?;
        let len = s.virtual_size.min(s.raw_size) as usize;
        let start = s.file_offset as usize;
        data.get(start..start.checked_add(len)?)
    }

    /// The first address after every section.
    pub fn end_rva(&self) -> u64 {
        self.sections
            .iter()
            .map(|s| u64::from(s.rva) + u64::from(s.virtual_size.max(s.raw_size)))
            .max()
            .unwrap_or(0)
    }

    /// The alignment the added sections get: whole pages, and at least the image's own.
    pub fn added_alignment(&self) -> u64 {
        PAGE.max(u64::from(self.section_alignment))
    }

    /// Problems with the layout: sections whose virtual ranges overlap, an image size that
    /// does not cover every section, and among the sections named in `added`, addresses not
    /// aligned to [`PeLayout::added_alignment`] or file data not aligned to the file
    /// alignment. (The stub's own sections are not held to its `SectionAlignment`: Debian
    /// 12's puts `.sdmagic` at 0x19100 with an alignment of 0x200, and firmware loads it.)
    pub fn problems(&self, added: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        let sa = self.added_alignment();
        let fa = u64::from(self.file_alignment.max(1));
        for s in self
            .sections
            .iter()
            .filter(|s| added.contains(&s.name.as_str()))
        {
            if u64::from(s.rva) % sa != 0 {
                out.push(format!(
                    "{} at {:#x} is not aligned to {sa:#x}",
                    s.name, s.rva
                ));
            }
            if s.raw_size > 0 && u64::from(s.file_offset) % fa != 0 {
                out.push(format!(
                    "{}'s data at file offset {:#x} is not aligned to {fa:#x}",
                    s.name, s.file_offset
                ));
            }
        }
        let mut by_rva: Vec<&PeSection> = self.sections.iter().collect();
        by_rva.sort_by_key(|s| s.rva);
        for w in by_rva.windows(2) {
            let end = u64::from(w[0].rva) + u64::from(w[0].virtual_size);
            if end > u64::from(w[1].rva) {
                out.push(format!(
                    "{} ({:#x}..{end:#x}) overlaps {} at {:#x}",
                    w[0].name, w[0].rva, w[1].name, w[1].rva
                ));
            }
        }
        let end = self
            .sections
            .iter()
            .map(|s| u64::from(s.rva) + u64::from(s.virtual_size))
            .max()
            .unwrap_or(0);
        if u64::from(self.size_of_image) < end {
            out.push(format!(
                "SizeOfImage {:#x} ends before the last section ({end:#x})",
                self.size_of_image
            ));
        }
        out
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// The relative virtual addresses of sections of `sizes` added after the stub's last
/// section, in order, each aligned to [`PeLayout::added_alignment`].
pub fn place(stub: &PeLayout, sizes: &[u64]) -> Vec<u64> {
    let align = stub.added_alignment();
    let mut next = align_up(stub.end_rva(), align);
    sizes
        .iter()
        .map(|&size| {
            let at = next;
            next = align_up(at + size.max(1), align);
            at
        })
        .collect()
}

/// The parts of a UKI.
#[derive(Debug, Clone)]
pub struct UkiInput<'a> {
    /// systemd-stub (`linuxx64.efi.stub`).
    pub stub: &'a Path,
    /// The kernel's bzImage.
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    /// The `.osrel` text ([`os_release`]).
    pub os_release: &'a str,
}

/// The os-release of a Bulkhead UKI for `system` with the kernel `abi` (what a boot menu
/// such as systemd-boot shows).
pub fn os_release(system: &str, abi: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.+ ".contains(*c))
            .collect()
    };
    format!(
        "NAME=\"Bulkhead\"\nID=bulkhead\nVERSION_ID={}\nPRETTY_NAME=\"Bulkhead {} ({}, Linux {})\"\n",
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION"),
        clean(system),
        clean(abi)
    )
}

/// Writes the UKI of `input` to `out` (through a temporary file beside it) and returns its
/// layout, after checking that every section is there, the layout is sound and each
/// payload section holds exactly its input's size.
pub fn build(input: &UkiInput<'_>, out: &Path) -> Result<PeLayout, EfiError> {
    let stub_data = std::fs::read(input.stub).map_err(io(input.stub))?;
    let stub = PeLayout::parse(&stub_data).map_err(|detail| EfiError::NotPe {
        path: input.stub.to_path_buf(),
        detail,
    })?;
    for name in SECTIONS {
        if stub.section(name).is_some() {
            return Err(EfiError::SectionTaken {
                path: input.stub.to_path_buf(),
                section: name.into(),
            });
        }
    }
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let parts_dir = parent.join(format!(
        ".{}.parts",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&parts_dir).map_err(io(&parts_dir))?;
    let osrel = parts_dir.join("osrel");
    std::fs::write(&osrel, input.os_release).map_err(io(&osrel))?;
    let cmdline = parts_dir.join("cmdline");
    std::fs::write(&cmdline, input.cmdline).map_err(io(&cmdline))?;
    let files: [PathBuf; 4] = [
        osrel,
        cmdline,
        input.initrd.to_path_buf(),
        input.kernel.to_path_buf(),
    ];
    let mut sizes = Vec::new();
    for f in &files {
        sizes.push(std::fs::metadata(f).map_err(io(f))?.len());
    }
    let rvas = place(&stub, &sizes);
    let tmp = parent.join(format!(
        ".{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut cmd = Command::new("objcopy");
    for ((name, file), rva) in SECTIONS.iter().zip(&files).zip(&rvas) {
        // The kernel is entered in place: code, so firmware that maps data non-executable
        // still runs it.
        let flags = if *name == ".linux" {
            "code,readonly"
        } else {
            "data,readonly"
        };
        cmd.arg("--add-section")
            .arg(format!("{name}={}", file.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={:#x}", stub.image_base + rva))
            .arg("--set-section-flags")
            .arg(format!("{name}={flags}"));
    }
    cmd.arg(input.stub).arg(&tmp);
    let shown = format!("{cmd:?}").replace('"', "");
    let objcopy_err = |detail: String| EfiError::Objcopy {
        command: shown.clone(),
        detail,
    };
    let res = cmd.output().map_err(|e| objcopy_err(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&parts_dir);
    if !res.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(objcopy_err(format!(
            "{}: {}",
            res.status,
            String::from_utf8_lossy(&res.stderr).trim()
        )));
    }
    let data = std::fs::read(&tmp).map_err(io(&tmp))?;
    let not_pe = |detail: String| EfiError::NotPe {
        path: tmp.clone(),
        detail,
    };
    let layout = PeLayout::parse(&data).map_err(not_pe)?;
    let mut problems = layout.problems(&SECTIONS);
    for ((name, size), rva) in SECTIONS.iter().zip(&sizes).zip(&rvas) {
        match layout.section(name) {
            None => problems.push(format!("{name} is missing")),
            Some(s) if u64::from(s.virtual_size) != *size || u64::from(s.rva) != *rva => problems
                .push(format!(
                    "{name} is {:#x} bytes at {:#x}, wanted {size:#x} at {rva:#x}",
                    s.virtual_size, s.rva
                )),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        return Err(not_pe(problems.join("; ")));
    }
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stub_like() -> PeLayout {
        // Debian 12's linuxx64.efi.stub (systemd 252), as `objdump -h` shows it.
        let s = |name: &str, rva, size, off| PeSection {
            name: name.into(),
            rva,
            virtual_size: size,
            file_offset: off,
            raw_size: size.div_ceil(0x200) * 0x200,
        };
        PeLayout {
            image_base: 0,
            section_alignment: 0x200,
            file_alignment: 0x200,
            size_of_image: 0x19300,
            sections: vec![
                s(".text", 0x4000, 0xbff0, 0x400),
                s(".data", 0x11000, 0x34b8, 0xc600),
                s(".sbat", 0x19000, 0xe2, 0x11000),
                s(".sdmagic", 0x19100, 0x34, 0x11200),
            ],
        }
    }

    #[test]
    fn added_sections_follow_the_stub_page_aligned_without_overlap() {
        let stub = stub_like();
        assert!(
            stub.problems(&SECTIONS).is_empty(),
            "{:?}",
            stub.problems(&SECTIONS)
        );
        let sizes = [0x80, 0x40, 0x123_4567, 0xd8_87c0];
        let rvas = place(&stub, &sizes);
        assert_eq!(
            rvas[0], 0x1a000,
            "after .sdmagic's raw end 0x19300, page aligned"
        );
        for (i, r) in rvas.iter().enumerate() {
            assert_eq!(r % PAGE, 0, "section {i} at {r:#x}");
            if i > 0 {
                assert!(rvas[i - 1] + sizes[i - 1] <= *r, "overlap at {i}");
            }
        }
        // An image with a larger section alignment keeps its own.
        let mut big = stub;
        big.section_alignment = 0x10000;
        assert!(place(&big, &[1, 1]).iter().all(|r| r % 0x10000 == 0));
    }

    #[test]
    fn layout_problems_are_found() {
        let mut l = stub_like();
        l.sections[1].rva = 0x4100; // inside .text, and not aligned
        l.sections[2].file_offset = 0x11001;
        l.size_of_image = 0x1000;
        let p = l.problems(&[".data", ".sbat"]).join("\n");
        assert!(
            p.contains(".data at 0x4100 is not aligned to 0x1000"),
            "{p}"
        );
        assert!(p.contains(".text (0x4000..0xfff0) overlaps .data"), "{p}");
        assert!(p.contains(".sbat's data at file offset 0x11001"), "{p}");
        assert!(p.contains("SizeOfImage 0x1000 ends before"), "{p}");
        // The stub's own sections are not held to the added sections' alignment.
        assert!(!l.problems(&[]).join("\n").contains("not aligned"));
    }

    #[test]
    fn os_release_names_the_system_and_kernel_and_cannot_be_broken_by_quotes() {
        let o = os_release("demo\"\nID=evil", "6.1.0-57-cloud-amd64");
        assert!(o.contains("ID=bulkhead\n"));
        assert!(
            o.contains("(demoIDevil, Linux 6.1.0-57-cloud-amd64)\""),
            "{o}"
        );
        assert_eq!(o.lines().count(), 4);
    }
}
