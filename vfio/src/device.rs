//! One passed-through PCI function: regions, interrupts and reset, over its VFIO
//! device descriptor.
//!
//! Opened from a [`crate::Container`] ([`crate::Container::open_device`]) or adopted
//! from a descriptor init passed ([`Device::from_fd`]). Holds no reference to the
//! container: the kernel keeps the group alive while the device is open.
//!
//! What the VMM still owns: which parts of config space to emulate (BARs, MSI/MSI-X
//! capabilities, command register), keeping the MSI-X table trapped rather than
//! mapped, and resetting the device at VM start and end.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_REGIONS,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::EventFd;

use crate::bdf::Bdf;
use crate::error::{Result, VfioError};
use crate::ioctls;

/// Region index of BAR0; BARs 0..=5 are indices 0..=5.
pub const BAR0_REGION: u32 = 0;
/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;
/// Region index of PCI config space.
pub const CONFIG_REGION: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// Interrupt index of legacy INTx.
pub const INTX_IRQ: u32 = VFIO_PCI_INTX_IRQ_INDEX;
/// Interrupt index of MSI.
pub const MSI_IRQ: u32 = VFIO_PCI_MSI_IRQ_INDEX;
/// Interrupt index of MSI-X.
pub const MSIX_IRQ: u32 = VFIO_PCI_MSIX_IRQ_INDEX;
/// The command register's offset in config space, and its memory-space enable bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 0x2;

/// One region of a device as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (0..=5 BARs, 6 ROM, 7 config space, 8 VGA).
    pub index: u32,
    /// Size in bytes; 0 when the device does not implement it.
    pub size: u64,
    /// Offset of the region in the device file (for pread/pwrite/mmap).
    pub offset: u64,
    /// Reads are allowed.
    pub readable: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// The parts of the region that may be mmap'd, as (offset within the region,
    /// size): the whole region, the sparse areas the kernel lists, or nothing.
    pub mmap_areas: Vec<(u64, u64)>,
    /// The kernel allows the MSI-X table in this region to be mmap'd
    /// (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`). The VMM must still trap guest
    /// accesses to the table to emulate it.
    pub msix_mappable: bool,
}

/// The interrupts of one kind (INTx, MSI, MSI-X, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// Interrupt index.
    pub index: u32,
    /// How many vectors the device has of this kind (0: none).
    pub count: u32,
    /// `VFIO_IRQ_INFO_*` flags (eventfd, maskable, automasked, noresize).
    pub flags: u32,
}

/// An mmap'd area of a device region; unmapped on drop. Map it into the guest as a
/// KVM memory slot. It is device memory: access it only with volatile operations of
/// the width the device expects.
#[derive(Debug)]
pub struct MappedArea {
    addr: NonNull<c_void>,
    size: usize,
    /// Region index.
    pub index: u32,
    /// Offset of the area within the region.
    pub offset: u64,
}

// SAFETY: the mapping is shared memory of the device file; it is not tied to the
// thread that created it, and MappedArea only hands out its address.
unsafe impl Send for MappedArea {}
// SAFETY: as above; MappedArea has no state besides the address and size.
unsafe impl Sync for MappedArea {}

impl MappedArea {
    /// Host address of the mapping.
    pub fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr().cast()
    }

    /// Size of the mapping in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for MappedArea {
    fn drop(&mut self) {
        // SAFETY: addr/size are exactly what a successful mmap returned, and nothing
        // else unmaps them.
        let rc = unsafe { libc::munmap(self.addr.as_ptr(), self.size) };
        if rc != 0 {
            log::warn!(
                "munmap of region {} area at {:#x} failed: {}",
                self.index,
                self.offset,
                io::Error::last_os_error()
            );
        }
    }
}

/// An open VFIO PCI device.
#[derive(Debug)]
pub struct Device {
    bdf: Bdf,
    file: File,
    flags: u32,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
}

fn ioctl_err(op: &'static str) -> impl FnOnce(io::Error) -> VfioError {
    move |source| VfioError::Ioctl { op, source }
}

impl Device {
    /// Adopts an open VFIO device descriptor for `bdf` (from
    /// `VFIO_GROUP_GET_DEVICE_FD`, possibly done by init) and reads its regions and
    /// interrupts.
    pub fn from_fd(bdf: Bdf, fd: OwnedFd) -> Result<Self> {
        let file = File::from(fd);
        let info = ioctls::device_info(&file).map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0
            || info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX
            || info.num_irqs <= VFIO_PCI_MSIX_IRQ_INDEX
        {
            return Err(VfioError::Ioctl {
                op: "VFIO_DEVICE_GET_INFO",
                source: io::Error::other(format!(
                    "{bdf} is not a VFIO PCI device (flags {:#x}, {} regions, {} irqs)",
                    info.flags, info.num_regions, info.num_irqs
                )),
            });
        }
        let mut regions = Vec::new();
        for index in 0..info.num_regions.min(VFIO_PCI_NUM_REGIONS) {
            regions.push(read_region_info(&file, index)?);
        }
        let mut irqs = Vec::new();
        for index in 0..info.num_irqs {
            let (count, flags) = match ioctls::irq_info(&file, index) {
                Ok(irq) => (irq.count, irq.flags),
                // EINVAL: an interrupt kind this device lacks (the error interrupt of
                // a conventional PCI device).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (0, 0),
                Err(source) => {
                    return Err(VfioError::Ioctl {
                        op: "VFIO_DEVICE_GET_IRQ_INFO",
                        source,
                    })
                }
            };
            irqs.push(IrqInfo {
                index,
                count,
                flags,
            });
        }
        Ok(Device {
            bdf,
            file,
            flags: info.flags,
            regions,
            irqs,
        })
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Information about region `index`.
    pub fn region(&self, index: u32) -> Option<&RegionInfo> {
        self.regions.get(index as usize)
    }

    /// Every PCI region the kernel reported (including empty ones, size 0).
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// The interrupts of kind `index` ([`INTX_IRQ`], [`MSI_IRQ`], [`MSIX_IRQ`]).
    pub fn irq(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(index as usize).copied()
    }

    /// Whether the kernel can reset this function (`VFIO_DEVICE_FLAGS_RESET`).
    pub fn can_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    fn file_offset(&self, index: u32, offset: u64, len: usize, write: bool) -> Result<u64> {
        let region = self.region(index);
        let size = region.map(|r| r.size).unwrap_or(0);
        let out = VfioError::RegionOutOfBounds {
            index,
            offset,
            len,
            size,
        };
        let Some(region) = region else {
            return Err(out);
        };
        let allowed = if write {
            region.writable
        } else {
            region.readable
        };
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if allowed && end <= size => region.offset.checked_add(offset).ok_or(out),
            _ => Err(out),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of region `index`. Bounds are checked, so
    /// a guest-chosen offset cannot reach outside the region.
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pos = self.file_offset(index, offset, buf.len(), false)?;
        self.file
            .read_exact_at(buf, pos)
            .map_err(|e| VfioError::io(format!("{} region {index} at {offset:#x}", self.bdf), e))
    }

    /// Writes `data` at `offset` of region `index` (bounds checked).
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let pos = self.file_offset(index, offset, data.len(), true)?;
        self.file
            .write_all_at(data, pos)
            .map_err(|e| VfioError::io(format!("{} region {index} at {offset:#x}", self.bdf), e))
    }

    /// Writes zeros over the whole of region `index` (a BAR) and returns how many bytes.
    /// Through a mapping of the whole region when VFIO allows one, with the function's
    /// memory decoding turned on for it (a reset leaves it off, and vfio-pci refuses a
    /// mapping's accesses then) and put back as it was; otherwise through the device file,
    /// a MiB at a time (vfio-pci turns decoding on for each access itself).
    pub fn zero_region(&self, index: u32) -> Result<u64> {
        let (size, whole) = self.region(index).map_or((0, false), |r| {
            (r.size, r.writable && r.mmap_areas.contains(&(0, r.size)))
        });
        if size > 0 && whole {
            let mut cmd = [0u8; 2];
            self.read_region(CONFIG_REGION, PCI_COMMAND, &mut cmd)?;
            let on = (u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY).to_le_bytes();
            self.write_region(CONFIG_REGION, PCI_COMMAND, &on)?;
            let zeroed = self.map_area(index, 0, size).map(|area| {
                // SAFETY: `area` is a live, writable shared mapping of exactly `size()`
                // bytes of the device's BAR, aliasing no Rust object.
                unsafe { std::ptr::write_bytes(area.host_addr(), 0, area.size()) };
            });
            let restored = self.write_region(CONFIG_REGION, PCI_COMMAND, &cmd);
            zeroed?;
            restored?;
            return Ok(size);
        }
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(size) as usize];
        let mut at = 0;
        while at < size {
            let n = CHUNK.min(size - at) as usize;
            self.write_region(index, at, zeros.get(..n).unwrap_or(&zeros))?;
            at += n as u64;
        }
        Ok(size)
    }

    /// Reads a 32-bit little-endian value from config space.
    pub fn read_config_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_region(CONFIG_REGION, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Maps `size` bytes at `offset` of region `index`; the range must lie inside
    /// one of [`RegionInfo::mmap_areas`].
    pub fn map_area(&self, index: u32, offset: u64, size: u64) -> Result<MappedArea> {
        let region = self.region(index);
        let bad = VfioError::RegionOutOfBounds {
            index,
            offset,
            len: usize::try_from(size).unwrap_or(usize::MAX),
            size: region.map(|r| r.size).unwrap_or(0),
        };
        let Some(region) = region else {
            return Err(bad);
        };
        let end = offset.checked_add(size);
        let inside = region.mmap_areas.iter().any(|&(a_off, a_size)| {
            let a_end = a_off.checked_add(a_size);
            matches!((end, a_end), (Some(e), Some(ae)) if offset >= a_off && e <= ae)
        });
        let pos = region.offset.checked_add(offset);
        let (true, Some(pos), Ok(len)) = (inside && size > 0, pos, usize::try_from(size)) else {
            return Err(bad);
        };
        let Ok(pos) = libc::off_t::try_from(pos) else {
            return Err(bad);
        };
        let mut prot = 0;
        if region.readable {
            prot |= libc::PROT_READ;
        }
        if region.writable {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a new shared mapping at an address the kernel chooses; it aliases no
        // Rust object, and the mapping keeps its own reference to the file.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                pos,
            )
        };
        let what = || format!("mmap of {} region {index} at {offset:#x}", self.bdf);
        if addr == libc::MAP_FAILED {
            return Err(VfioError::io(what(), io::Error::last_os_error()));
        }
        let addr =
            NonNull::new(addr).ok_or_else(|| VfioError::io(what(), io::Error::other("NULL")))?;
        Ok(MappedArea {
            addr,
            size: len,
            index,
            offset,
        })
    }

    /// Sets eventfds for vectors `start..start + fds.len()` of interrupt kind
    /// `index`; `None` detaches a vector.
    pub fn set_irq_eventfds(&self, index: u32, start: u32, fds: &[Option<&EventFd>]) -> Result<()> {
        let irq = self
            .irq(index)
            .filter(|i| i.flags & VFIO_IRQ_INFO_EVENTFD != 0);
        let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        let fits = irq.is_some_and(|i| start.checked_add(count).is_some_and(|end| end <= i.count));
        if !fits || fds.is_empty() {
            return Err(VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS",
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} eventfds from vector {start} do not fit interrupt index {index} \
                         ({} vectors)",
                        fds.len(),
                        irq.map(|i| i.count).unwrap_or(0)
                    ),
                ),
            });
        }
        let data: Vec<u32> = fds
            .iter()
            .map(|f| f.map(|e| e.as_raw_fd()).unwrap_or(-1) as u32)
            .collect();
        ioctls::set_irqs(
            &self.file,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
            &data,
        )
        .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS (trigger eventfds)"))
    }

    /// Routes INTx to `trigger`. The kernel masks the line each time it fires and
    /// unmasks it when `resample` is signalled (wire `resample` to KVM's irqfd
    /// resampler, or call [`Self::unmask_intx`]).
    pub fn enable_intx(&self, trigger: &EventFd, resample: &EventFd) -> Result<()> {
        self.set_irq_eventfds(INTX_IRQ, 0, &[Some(trigger)])?;
        let fd = resample.as_raw_fd() as u32;
        ioctls::set_irqs(
            &self.file,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
            INTX_IRQ,
            0,
            1,
            &[fd],
        )
        .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS (INTx resample)"))
    }

    /// Unmasks INTx after it fired (what a signal on the resample eventfd does).
    pub fn unmask_intx(&self) -> Result<()> {
        ioctls::set_irqs(
            &self.file,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
            INTX_IRQ,
            0,
            1,
            &[],
        )
        .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS (INTx unmask)"))
    }

    /// Enables MSI with one eventfd per vector (the guest's enabled vector count).
    pub fn enable_msi(&self, fds: &[&EventFd]) -> Result<()> {
        let fds: Vec<Option<&EventFd>> = fds.iter().copied().map(Some).collect();
        self.set_irq_eventfds(MSI_IRQ, 0, &fds)
    }

    /// Enables MSI-X with one eventfd per vector from vector 0.
    pub fn enable_msix(&self, fds: &[&EventFd]) -> Result<()> {
        let fds: Vec<Option<&EventFd>> = fds.iter().copied().map(Some).collect();
        self.set_irq_eventfds(MSIX_IRQ, 0, &fds)
    }

    /// Disables every vector of interrupt kind `index`.
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        ioctls::set_irqs(
            &self.file,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            0,
            &[],
        )
        .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS (disable)"))
    }

    /// Resets the function with the first method in its sysfs `reset_method`.
    pub fn reset(&self) -> Result<()> {
        if !self.can_reset() {
            return Err(VfioError::Ioctl {
                op: "VFIO_DEVICE_RESET",
                source: io::Error::other(format!(
                    "{} has no reset method (no FLR, PM or bus reset)",
                    self.bdf
                )),
            });
        }
        ioctls::reset(&self.file).map_err(ioctl_err("VFIO_DEVICE_RESET"))
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn read_region_info(file: &File, index: u32) -> Result<RegionInfo> {
    let (info, bytes) = match ioctls::region_info(file, index) {
        Ok(reply) => reply,
        // vfio-pci answers EINVAL for a region the device lacks (the VGA region of a
        // device that is not a VGA controller): report it empty.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok(RegionInfo {
                index,
                size: 0,
                offset: 0,
                readable: false,
                writable: false,
                mmap_areas: Vec::new(),
                msix_mappable: false,
            })
        }
        Err(source) => {
            return Err(VfioError::Ioctl {
                op: "VFIO_DEVICE_GET_REGION_INFO",
                source,
            })
        }
    };
    let caps = if info.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
        parse_caps(&bytes, info.cap_offset)
    } else {
        Caps::default()
    };
    let mmap_areas = if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || info.size == 0 {
        Vec::new()
    } else {
        caps.sparse.unwrap_or_else(|| vec![(0, info.size)])
    };
    Ok(RegionInfo {
        index,
        size: info.size,
        offset: info.offset,
        readable: info.flags & VFIO_REGION_INFO_FLAG_READ != 0,
        writable: info.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap_areas,
        msix_mappable: caps.msix_mappable,
    })
}

#[derive(Default, Debug, PartialEq)]
struct Caps {
    sparse: Option<Vec<(u64, u64)>>,
    msix_mappable: bool,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Walks a region-info capability chain (`vfio_info_cap_header {id, version, next}`
/// at `first`, offsets from the start of the reply). Malformed chains end the walk.
fn parse_caps(bytes: &[u8], first: u32) -> Caps {
    let mut caps = Caps::default();
    let mut at = first as usize;
    // A chain longer than this is corrupt.
    for _ in 0..16 {
        if at == 0 {
            break;
        }
        let (Some(id), Some(next)) = (u16_at(bytes, at), u32_at(bytes, at + 4)) else {
            break;
        };
        match u32::from(id) {
            VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                // header (8), nr_areas (4), reserved (4), then {offset, size} pairs.
                let nr = u32_at(bytes, at + 8).unwrap_or(0) as usize;
                let mut areas = Vec::new();
                for i in 0..nr.min(64) {
                    let base = at + 16 + i * 16;
                    match (u64_at(bytes, base), u64_at(bytes, base + 8)) {
                        (Some(off), Some(size)) if size > 0 => areas.push((off, size)),
                        (Some(_), Some(_)) => {}
                        _ => break,
                    }
                }
                caps.sparse = Some(areas);
            }
            VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => caps.msix_mappable = true,
            _ => {}
        }
        at = next as usize;
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: u16, next: u32) -> Vec<u8> {
        let mut v = id.to_ne_bytes().to_vec();
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&next.to_ne_bytes());
        v
    }

    #[test]
    fn capability_chain_with_sparse_areas_and_msix_mappable() {
        // 32 bytes of vfio_region_info, then a sparse-mmap cap at 32 with two areas
        // (one empty), then an MSI-X-mappable cap.
        let mut b = vec![0u8; 32];
        let sparse_len = 16 + 2 * 16;
        b.extend(header(
            VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16,
            32 + sparse_len,
        ));
        b.extend_from_slice(&2u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for (off, size) in [(0u64, 0x3000u64), (0x4000, 0)] {
            b.extend_from_slice(&off.to_ne_bytes());
            b.extend_from_slice(&size.to_ne_bytes());
        }
        b.extend(header(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16, 0));
        let caps = parse_caps(&b, 32);
        assert_eq!(caps.sparse, Some(vec![(0, 0x3000)]));
        assert!(caps.msix_mappable);
    }

    #[test]
    fn truncated_or_looping_chains_end_quietly() {
        let mut b = vec![0u8; 32];
        b.extend(header(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, 0));
        b.extend_from_slice(&1000u32.to_ne_bytes()); // claims 1000 areas, has none
        assert_eq!(parse_caps(&b, 32).sparse, Some(vec![]));
        assert_eq!(parse_caps(&b, 4096), Caps::default());
        // A cap pointing at itself stops after the bounded walk.
        let mut l = vec![0u8; 32];
        l.extend(header(VFIO_REGION_INFO_CAP_MSIX_MAPPABLE as u16, 32));
        assert!(parse_caps(&l, 32).msix_mappable);
        assert_eq!(parse_caps(&[], u32::MAX), Caps::default());
    }
}
