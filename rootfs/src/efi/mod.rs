//! Booting a Bulkhead host from UEFI firmware: one EFI executable, a unified kernel image
//! (UKI) made of Debian's systemd-stub, the host kernel, our initramfs and the kernel
//! command line ([`uki`]); the stub fetched from Debian's `systemd-boot-efi` package into the
//! cache, never installed ([`stub`]); a FAT EFI system partition holding it at the
//! removable-media path, and Debian's OVMF firmware to boot it under QEMU ([`esp`]).

pub mod esp;
pub mod stub;
pub mod uki;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EfiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PE32+ EFI executable: {detail}")]
    NotPe { path: PathBuf, detail: String },
    #[error("{path}: the stub already has a {section} section (is it a UKI already?)")]
    SectionTaken { path: PathBuf, section: String },
    #[error("`{command}` failed: {detail} (objcopy is Debian's binutils; run `bulkhead-rootfs provision`)")]
    Objcopy { command: String, detail: String },
    #[error("no systemd-stub in the cache ({path}): run `bulkhead-rootfs provision`")]
    NoStub { path: PathBuf },
    #[error("no OVMF firmware ({tried}): run `bulkhead-rootfs provision` (Debian's package ovmf)")]
    NoOvmf { tried: String },
    #[error("the EFI system partition {path}: {detail}")]
    Fat { path: PathBuf, detail: String },
}

pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EfiError + '_ {
    move |source| EfiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the unified kernel image of a host: the cached systemd-stub with `kernel`, the
/// host initramfs `initrd` and `cmdline`, named for `system` in its os-release.
pub fn host_uki(
    cache: &crate::kernel::Cache,
    kernel: &crate::kernel::Kernel,
    initrd: &std::path::Path,
    cmdline: &str,
    system: &str,
    out: &std::path::Path,
) -> Result<uki::PeLayout, EfiError> {
    let stub = stub::in_cache(cache)?;
    let os_release = uki::os_release(system, &kernel.abi);
    uki::build(
        &uki::UkiInput {
            stub: &stub,
            kernel: &kernel.vmlinuz,
            initrd,
            cmdline,
            os_release: &os_release,
        },
        out,
    )
}
