//! Loading a bzImage, its initramfs and command line, and writing the zero page
//! (Linux x86 boot protocol, 64-bit entry).

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::e820;
use super::layout::{CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_ADDR};
use crate::vstate::memory::GuestMemoryMmap;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

/// Errors loading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// linux-loader rejected the image.
    #[error("cannot load the bzImage: {0}")]
    Kernel(linux_loader::loader::Error),
    /// The image has no 64-bit entry point.
    #[error("the kernel does not support the 64-bit boot protocol (xloadflags {0:#x})")]
    Not64Bit(u16),
    /// The image is not a bzImage with a setup header.
    #[error("the kernel image has no setup header")]
    NoSetupHeader,
    /// The command line is too long or has bad characters.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit.
    #[error("initramfs of {size} bytes does not fit below {limit:#x} above the kernel")]
    InitramfsTooBig {
        /// Its size.
        size: u64,
        /// The highest address usable.
        limit: u64,
    },
    /// Reading the initramfs failed.
    #[error("cannot read the initramfs: {0}")]
    InitramfsRead(std::io::Error),
    /// Writing the zero page failed.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    /// Too many e820 entries (cannot happen with our map).
    #[error("e820 map too large")]
    E820,
}

/// Where things were put.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The end of the loaded kernel image.
    pub kernel_end: u64,
    /// Initramfs placement (address, size), if any.
    pub initramfs: Option<(u64, u64)>,
}

/// Loads `kernel` (+ `initramfs`) with `cmdline` into `mem` of `mem_size` bytes and writes the
/// zero page pointing at the ACPI RSDP `rsdp`.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &mut File,
    initramfs: Option<&mut File>,
    cmdline: &str,
    rsdp: u64,
) -> Result<KernelEntry, BootError> {
    let loaded = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(BootError::Kernel)?;
    let mut hdr = loaded.setup_header.ok_or(BootError::NoSetupHeader)?;
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::Not64Bit(hdr.xloadflags));
    }
    let kernel_end = loaded.kernel_end;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let initramfs = match initramfs {
        Some(f) => Some(load_initramfs(mem, mem_size, f, kernel_end, &hdr)?),
        None => None,
    };

    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initramfs {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820::memory_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::E820);
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = (*e).into();
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::ZeroPage)?;

    Ok(KernelEntry {
        entry: loaded.kernel_load.0 + STARTUP_64_OFFSET,
        kernel_end,
        initramfs,
    })
}

/// Puts the initramfs at the top of low RAM (below the MMIO gap and `initrd_addr_max`).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    file: &mut File,
    kernel_end: u64,
    hdr: &linux_loader::loader::bootparam::setup_header,
) -> Result<(u64, u64), BootError> {
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(BootError::InitramfsRead)?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::InitramfsRead)?;
    let max = if hdr.initrd_addr_max == 0 {
        0x37ff_ffff
    } else {
        u64::from(hdr.initrd_addr_max)
    };
    let limit = mem_size.min(MMIO_GAP_START).min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitramfsTooBig { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| BootError::InitramfsRead(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}
