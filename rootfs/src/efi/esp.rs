//! An EFI system partition image (FAT, written with the `fatfs` crate) holding one EFI
//! executable at the removable-media path `EFI/BOOT/BOOTX64.EFI`, which firmware starts
//! without any boot entry; and Debian's OVMF firmware (package `ovmf`) to boot it under
//! QEMU.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{io, EfiError};

/// Where firmware looks for a bootloader on removable media (x86-64).
pub const REMOVABLE_PATH: &str = "EFI/BOOT/BOOTX64.EFI";

/// The size of an ESP image for a file of `len` bytes: the file, 10 % and 8 MiB for the
/// filesystem's own structures, in whole MiB.
pub fn image_size(len: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    (len + len / 10 + 8 * MIB).div_ceil(MIB) * MIB
}

/// Writes a FAT image at `out` (replaced) with `efi` at [`REMOVABLE_PATH`].
pub fn write_esp(efi: &Path, out: &Path) -> Result<(), EfiError> {
    let fat = |detail: String| EfiError::Fat {
        path: out.to_path_buf(),
        detail,
    };
    let len = std::fs::metadata(efi).map_err(io(efi))?.len();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let mut img = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io(out))?;
    img.set_len(image_size(len)).map_err(io(out))?;
    fatfs::format_volume(
        &mut img,
        fatfs::FormatVolumeOptions::new().volume_label(*b"BULKHEADESP"),
    )
    .map_err(|e| fat(format!("formatting: {e}")))?;
    img.seek(SeekFrom::Start(0)).map_err(io(out))?;
    let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new())
        .map_err(|e| fat(format!("opening: {e}")))?;
    {
        let root = fs.root_dir();
        let boot = root
            .create_dir("EFI")
            .and_then(|d| d.create_dir("BOOT"))
            .map_err(|e| fat(format!("EFI/BOOT: {e}")))?;
        let mut dst = boot
            .create_file("BOOTX64.EFI")
            .map_err(|e| fat(format!("{REMOVABLE_PATH}: {e}")))?;
        let mut src = File::open(efi).map_err(io(efi))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src.read(&mut buf).map_err(io(efi))?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n])
                .map_err(|e| fat(format!("{REMOVABLE_PATH}: {e}")))?;
        }
        dst.flush()
            .map_err(|e| fat(format!("{REMOVABLE_PATH}: {e}")))?;
    }
    fs.unmount().map_err(|e| fat(format!("unmounting: {e}")))?;
    Ok(())
}

/// Reads a file back from a FAT image (for checks).
pub fn read_file(image: &Path, path: &str) -> Result<Vec<u8>, EfiError> {
    let fat = |detail: String| EfiError::Fat {
        path: image.to_path_buf(),
        detail,
    };
    let img = File::open(image).map_err(io(image))?;
    let fs = fatfs::FileSystem::new(img, fatfs::FsOptions::new())
        .map_err(|e| fat(format!("opening: {e}")))?;
    let mut f = fs
        .root_dir()
        .open_file(path)
        .map_err(|e| fat(format!("{path}: {e}")))?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)
        .map_err(|e| fat(format!("{path}: {e}")))?;
    Ok(out)
}

/// Debian's OVMF images: (code, variables template). Debian 13 ships only the 4 MiB
/// variant; Debian 12 both.
pub const OVMF_CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
];

/// Firmware for a machine: OVMF's code (read-only), a private copy of its variable store,
/// and the ESP image it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars: PathBuf,
    pub esp: PathBuf,
}

impl Firmware {
    /// OVMF (without Secure Boot keys) with a fresh copy of its variables at `vars`, booting
    /// `esp`.
    pub fn ovmf(esp: &Path, vars: &Path) -> Result<Self, EfiError> {
        let (code, template) = OVMF_CANDIDATES
            .iter()
            .find(|(c, v)| Path::new(c).is_file() && Path::new(v).is_file())
            .ok_or_else(|| EfiError::NoOvmf {
                tried: OVMF_CANDIDATES
                    .iter()
                    .map(|(c, _)| *c)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        std::fs::copy(template, vars).map_err(io(vars))?;
        Ok(Self {
            code: PathBuf::from(code),
            vars: vars.to_path_buf(),
            esp: esp.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_esp_holds_the_executable_at_the_removable_path() {
        let dir = tempfile::tempdir().unwrap();
        let efi = dir.path().join("x.efi");
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&efi, &body).unwrap();
        let esp = dir.path().join("esp.img");
        write_esp(&efi, &esp).unwrap();
        assert_eq!(
            std::fs::metadata(&esp).unwrap().len(),
            image_size(body.len() as u64)
        );
        assert_eq!(read_file(&esp, REMOVABLE_PATH).unwrap(), body);
        // Writing again replaces the image.
        std::fs::write(&efi, b"MZ small").unwrap();
        write_esp(&efi, &esp).unwrap();
        assert_eq!(read_file(&esp, REMOVABLE_PATH).unwrap(), b"MZ small");
    }
}
