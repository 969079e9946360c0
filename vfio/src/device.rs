//! One passed-through PCI function, opened through its group into a [`Container`].
//!
//! A thin owner of vfio-ioctls' [`VfioDevice`]: region information (BARs, ROM,
//! config space), bounds-checked region reads and writes, mapping of the areas the
//! kernel allows to be mmap'd (for KVM memory slots), interrupts (INTx with
//! resample, MSI, MSI-X) through eventfds, and reset.
//!
//! What the VMM still owns: which parts of config space to emulate (BARs, MSI/MSI-X
//! capabilities, command register), keeping the MSI-X table page trapped rather
//! than mapped, and resetting the device at VM start and end.

use std::ffi::c_void;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioIrq, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::bdf::Bdf;
use crate::container::Container;
use crate::error::{Result, VfioError};
use crate::group::group_viable;
use crate::sysfs::SysfsRoot;

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

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
}

/// An mmap'd area of a device region; unmapped on drop. Map it into the guest as a
/// KVM memory slot. Its memory is device memory: access it only with volatile
/// operations of the width the device expects.
#[derive(Debug)]
pub struct MappedArea {
    addr: NonNull<c_void>,
    size: usize,
    /// Region index.
    pub index: u32,
    /// Offset of the area within the region.
    pub offset: u64,
}

// SAFETY: the mapping is plain shared memory of the device file; it is not tied to
// the thread that created it and MappedArea only hands out its address.
unsafe impl Send for MappedArea {}
// SAFETY: as above; MappedArea has no interior state besides the address and size.
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
pub struct Device {
    bdf: Bdf,
    group: u32,
    inner: VfioDevice,
}

impl Device {
    /// Opens `bdf`, which must already be bound to vfio-pci
    /// ([`crate::bind_to_vfio_pci`]), attaching its IOMMU group to `container`.
    ///
    /// Errors: [`VfioError::DeviceMissing`], [`VfioError::NoGroup`],
    /// [`VfioError::BindFailed`] when it is not bound to vfio-pci,
    /// [`VfioError::GroupNotViable`], and [`VfioError::DeviceInUse`] when the
    /// kernel answers EBUSY (another process holds the group or the device).
    pub fn open(root: &SysfsRoot, container: &Container, bdf: Bdf) -> Result<Self> {
        let func = root.function(bdf)?;
        let group = func.iommu_group.ok_or_else(|| VfioError::NoGroup {
            bdf,
            path: func.path.join("iommu_group"),
        })?;
        if !func.is_bound_to_vfio_pci() {
            return Err(VfioError::BindFailed {
                bdf,
                detail: format!(
                    "it is bound to {} instead of vfio-pci; bind it first",
                    func.driver.as_deref().unwrap_or("no driver")
                ),
            });
        }
        group_viable(root, group)?;
        let inner = VfioDevice::new(&func.path, container.ops(), false)
            .map_err(|e| open_error(root, bdf, group, e))?;
        Ok(Device { bdf, group, inner })
    }

    /// The device's address.
    pub fn bdf(&self) -> Bdf {
        self.bdf
    }

    /// Its IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// Information about region `index`, or `None` for an index past the PCI
    /// regions.
    pub fn region(&self, index: u32) -> Option<RegionInfo> {
        if index >= VFIO_PCI_NUM_REGIONS {
            return None;
        }
        let flags = self.inner.get_region_flags(index);
        let size = self.inner.get_region_size(index);
        let mmap_areas = if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
            Vec::new()
        } else {
            let sparse = self
                .inner
                .get_region_caps(index)
                .into_iter()
                .find_map(|cap| match cap {
                    VfioRegionInfoCap::SparseMmap(s) => Some(s),
                    _ => None,
                });
            match sparse {
                Some(s) => s.areas.iter().map(|a| (a.offset, a.size)).collect(),
                None => vec![(0, size)],
            }
        };
        Some(RegionInfo {
            index,
            size,
            offset: self.inner.get_region_offset(index),
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap_areas,
        })
    }

    /// Every region the device implements (size > 0).
    pub fn regions(&self) -> Vec<RegionInfo> {
        (0..VFIO_PCI_NUM_REGIONS)
            .filter_map(|i| self.region(i))
            .filter(|r| r.size > 0)
            .collect()
    }

    fn checked(&self, index: u32, offset: u64, len: usize, write: bool) -> Result<u64> {
        let region = self.region(index);
        let size = region.as_ref().map(|r| r.size).unwrap_or(0);
        let out_of_bounds = VfioError::RegionOutOfBounds {
            index,
            offset,
            len,
            size,
        };
        let Some(region) = region else {
            return Err(out_of_bounds);
        };
        let end = offset.checked_add(len as u64);
        let allowed = if write {
            region.writable
        } else {
            region.readable
        };
        match end {
            Some(end) if end <= size && allowed => {
                region.offset.checked_add(offset).ok_or(out_of_bounds)
            }
            _ => Err(out_of_bounds),
        }
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (bounds checked, so a
    /// guest-chosen offset cannot reach outside the region).
    pub fn read_region(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pos = self.checked(index, offset, buf.len(), false)?;
        let pos = libc::off_t::try_from(pos).map_err(|_| VfioError::RegionOutOfBounds {
            index,
            offset,
            len: buf.len(),
            size: 0,
        })?;
        // SAFETY: the device fd is open for the lifetime of self; buf is a valid,
        // exclusively borrowed buffer of buf.len() bytes.
        let n = unsafe {
            libc::pread(
                self.inner.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                pos,
            )
        };
        self.io_result(n, buf.len(), index, offset)
    }

    /// Writes `data` at `offset` of region `index` (bounds checked).
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let pos = self.checked(index, offset, data.len(), true)?;
        let pos = libc::off_t::try_from(pos).map_err(|_| VfioError::RegionOutOfBounds {
            index,
            offset,
            len: data.len(),
            size: 0,
        })?;
        // SAFETY: the device fd is open for the lifetime of self; data is a valid
        // buffer of data.len() bytes that pwrite only reads.
        let n = unsafe {
            libc::pwrite(
                self.inner.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                pos,
            )
        };
        self.io_result(n, data.len(), index, offset)
    }

    fn io_result(&self, n: isize, want: usize, index: u32, offset: u64) -> Result<()> {
        let what = || format!("{} region {index} at {offset:#x}", self.bdf);
        if n < 0 {
            return Err(VfioError::io(what(), io::Error::last_os_error()));
        }
        if n as usize != want {
            return Err(VfioError::io(
                what(),
                io::Error::new(io::ErrorKind::UnexpectedEof, "short access"),
            ));
        }
        Ok(())
    }

    /// Maps the area at `offset` (within region `index`) of `size` bytes, which must
    /// be one of [`RegionInfo::mmap_areas`] or lie inside one.
    pub fn map_area(&self, index: u32, offset: u64, size: u64) -> Result<MappedArea> {
        let region = self.region(index);
        let bad = VfioError::RegionOutOfBounds {
            index,
            offset,
            len: usize::try_from(size).unwrap_or(usize::MAX),
            size: region.as_ref().map(|r| r.size).unwrap_or(0),
        };
        let Some(region) = region else {
            return Err(bad);
        };
        let inside = region.mmap_areas.iter().any(|&(a_off, a_size)| {
            offset >= a_off
                && offset
                    .checked_add(size)
                    .is_some_and(|end| a_off.checked_add(a_size).is_some_and(|a_end| end <= a_end))
        });
        let pos = region.offset.checked_add(offset);
        let (Some(pos), Ok(len), true) = (pos, usize::try_from(size), inside && size > 0) else {
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
        // SAFETY: a fresh shared mapping at an address the kernel chooses; it aliases
        // no Rust object. The fd stays open while the mapping exists or not: a
        // mapping holds its own reference to the file.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.inner.as_raw_fd(),
                pos,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(VfioError::io(
                format!("mmap of {} region {index} at {offset:#x}", self.bdf),
                io::Error::last_os_error(),
            ));
        }
        let addr = NonNull::new(addr).ok_or_else(|| {
            VfioError::io(
                format!("mmap of {} region {index}", self.bdf),
                io::Error::other("mmap returned NULL"),
            )
        })?;
        Ok(MappedArea {
            addr,
            size: len,
            index,
            offset,
        })
    }

    /// The interrupts of kind `index` ([`INTX_IRQ`], [`MSI_IRQ`], [`MSIX_IRQ`]).
    pub fn irq(&self, index: u32) -> Option<VfioIrq> {
        self.inner.get_irq_info(index).copied()
    }

    /// Routes INTx to `trigger`; the kernel masks the line when it fires and unmasks
    /// it when `resample` is signalled (wire `resample` to KVM's irqfd resampler).
    pub fn enable_intx(&self, trigger: &EventFd, resample: &EventFd) -> Result<()> {
        self.inner
            .enable_irq(INTX_IRQ, vec![trigger])
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS (INTx trigger)",
                source,
            })?;
        self.inner
            .set_irq_resample_fd(INTX_IRQ, vec![resample])
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS (INTx resample)",
                source,
            })
    }

    /// Routes MSI vectors to `fds` (one eventfd per vector, at most the count
    /// [`Self::irq`] reports).
    pub fn enable_msi(&self, fds: &[&EventFd]) -> Result<()> {
        self.inner
            .enable_msi(fds.to_vec())
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS (MSI)",
                source,
            })
    }

    /// Routes MSI-X vectors to `fds`.
    pub fn enable_msix(&self, fds: &[&EventFd]) -> Result<()> {
        self.inner
            .enable_msix(fds.to_vec())
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS (MSI-X)",
                source,
            })
    }

    /// Stops delivering interrupts of kind `index`.
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        self.inner
            .disable_irq(index)
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_DEVICE_SET_IRQS (disable)",
                source,
            })
    }

    /// Resets the function (the kernel uses the first method in its
    /// `reset_method`). Fails when the device cannot be reset.
    pub fn reset(&self) -> Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument and the fd is a VFIO device.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl(&self.inner, VFIO_DEVICE_RESET()) };
        if rc < 0 {
            return Err(VfioError::io(
                format!("VFIO_DEVICE_RESET of {}", self.bdf),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// The vfio-ioctls device, for calls this wrapper does not cover.
    pub fn vfio_device(&self) -> &VfioDevice {
        &self.inner
    }
}

fn open_error(root: &SysfsRoot, bdf: Bdf, group: u32, e: vfio_ioctls::VfioError) -> VfioError {
    use vfio_ioctls::VfioError as E;
    match e {
        E::OpenGroup(io, _) if io.raw_os_error() == Some(libc::EBUSY) => VfioError::DeviceInUse {
            what: format!("/dev/vfio/{group}"),
            detail: format!("another process holds IOMMU group {group} of {bdf}"),
        },
        E::GroupGetDeviceFD(errno) if errno.errno() == libc::EBUSY => VfioError::DeviceInUse {
            what: bdf.to_string(),
            detail: "the device is already open".to_string(),
        },
        E::GroupViable => match group_viable(root, group) {
            Err(viable) => viable,
            Ok(()) => VfioError::Ioctl {
                op: "opening the group",
                source: E::GroupViable,
            },
        },
        source => VfioError::Ioctl {
            op: "opening the device",
            source,
        },
    }
}
