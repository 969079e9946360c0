//! The legacy VFIO ioctls (container, group, device), one safe function each.
//!
//! Built on vfio-bindings' structures and vmm-sys-util's ioctl helpers rather than
//! vfio-ioctls' `VfioContainer`/`VfioDevice`, because those open `/dev/vfio/*` by
//! fixed paths and cannot adopt descriptors that init opened and passed down.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_region_info, VFIO_BASE, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_TYPE,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

vmm_sys_util::ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE as u32, VFIO_BASE);
vmm_sys_util::ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO_TYPE as u32, VFIO_BASE + 1);
vmm_sys_util::ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE as u32, VFIO_BASE + 2);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE as u32, VFIO_BASE + 3);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE as u32, VFIO_BASE + 4);
vmm_sys_util::ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE as u32, VFIO_BASE + 6);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE as u32, VFIO_BASE + 9);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// Size of a structure as the `argsz` field wants it.
fn argsz<T>() -> u32 {
    // VFIO structures are a few dozen bytes.
    size_of::<T>() as u32
}

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// VFIO_GET_API_VERSION on a container.
pub(crate) fn get_api_version(container: &impl AsRawFd) -> io::Result<i32> {
    // SAFETY: the ioctl takes no argument and only returns a number.
    check(unsafe { ioctl(container, VFIO_GET_API_VERSION()) })
}

/// VFIO_CHECK_EXTENSION on a container: whether it supports IOMMU type `ext`.
pub(crate) fn check_extension(container: &impl AsRawFd, ext: u32) -> io::Result<bool> {
    // SAFETY: the argument is passed by value and the ioctl only returns a number.
    let rc = check(unsafe { ioctl_with_val(container, VFIO_CHECK_EXTENSION(), ext.into()) })?;
    Ok(rc > 0)
}

/// VFIO_SET_IOMMU on a container that has at least one group.
pub(crate) fn set_iommu(container: &impl AsRawFd, iommu_type: u32) -> io::Result<()> {
    // SAFETY: the argument is passed by value.
    check(unsafe { ioctl_with_val(container, VFIO_SET_IOMMU(), iommu_type.into()) }).map(|_| ())
}

/// VFIO_GROUP_GET_STATUS: the group's flags (viable, container set).
pub(crate) fn group_status(group: &impl AsRawFd) -> io::Result<u32> {
    let mut status = vfio_group_status {
        argsz: argsz::<vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: the kernel writes at most argsz bytes into the exclusively borrowed struct.
    check(unsafe { ioctl_with_mut_ref(group, VFIO_GROUP_GET_STATUS(), &mut status) })?;
    Ok(status.flags)
}

/// VFIO_GROUP_SET_CONTAINER: attaches the group to the container.
pub(crate) fn group_set_container(group: &impl AsRawFd, container: RawFd) -> io::Result<()> {
    // SAFETY: the kernel reads one int (the container fd) from the borrowed value.
    check(unsafe { ioctl_with_ref(group, VFIO_GROUP_SET_CONTAINER(), &container) }).map(|_| ())
}

/// VFIO_GROUP_GET_DEVICE_FD: opens the device named `name` (its PCI address).
pub(crate) fn group_get_device_fd(group: &impl AsRawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: the kernel reads a NUL-terminated string from the borrowed CStr.
    let fd = check(unsafe { ioctl_with_ptr(group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) })?;
    // SAFETY: on success the ioctl returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// VFIO_DEVICE_GET_INFO.
pub(crate) fn device_info(device: &impl AsRawFd) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into the exclusively borrowed struct.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) })?;
    Ok(info)
}

/// VFIO_DEVICE_GET_REGION_INFO, with the capability chain when there is one:
/// returns the fixed part and the whole reply as bytes (the chain's offsets are
/// relative to its start).
pub(crate) fn region_info(
    device: &impl AsRawFd,
    index: u32,
) -> io::Result<(vfio_region_info, Vec<u8>)> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into the exclusively borrowed struct.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) })?;
    if info.argsz <= argsz::<vfio_region_info>() {
        return Ok((info, Vec::new()));
    }
    // The capabilities do not fit: ask again with a buffer of the size the kernel
    // asked for, aligned for the u64 fields of the structure at its start.
    let want = info.argsz as usize;
    let mut buf = vec![0u64; want.div_ceil(8)];
    let header = vfio_region_info {
        argsz: info.argsz,
        index,
        ..Default::default()
    };
    let ptr = buf.as_mut_ptr().cast::<vfio_region_info>();
    // SAFETY: buf is at least size_of::<vfio_region_info>() bytes (argsz is larger)
    // and 8-byte aligned, so writing one header at its start is in bounds.
    unsafe { ptr.write(header) };
    // SAFETY: the kernel writes at most header.argsz bytes, which is buf's size or
    // less; buf is exclusively borrowed for the call.
    check(unsafe { ioctl_with_mut_ptr(device, VFIO_DEVICE_GET_REGION_INFO(), ptr) })?;
    // SAFETY: the header was initialised above and updated by the kernel.
    let info = unsafe { ptr.read() };
    let bytes = buf
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(want)
        .collect();
    Ok((info, bytes))
}

/// VFIO_DEVICE_GET_IRQ_INFO.
pub(crate) fn irq_info(device: &impl AsRawFd, index: u32) -> io::Result<vfio_irq_info> {
    let mut info = vfio_irq_info {
        argsz: argsz::<vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes into the exclusively borrowed struct.
    check(unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_IRQ_INFO(), &mut info) })?;
    Ok(info)
}

/// VFIO_DEVICE_SET_IRQS with `data` as the payload (eventfds, bools, or nothing).
pub(crate) fn set_irqs(
    device: &impl AsRawFd,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: &[u32],
) -> io::Result<()> {
    // struct vfio_irq_set: argsz, flags, index, start, count, then the data array.
    const HEADER_WORDS: usize = 5;
    let mut buf: Vec<u32> = Vec::with_capacity(HEADER_WORDS + data.len());
    let total = (HEADER_WORDS + data.len()) * size_of::<u32>();
    let total = u32::try_from(total)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many interrupts"))?;
    buf.extend_from_slice(&[total, flags, index, start, count]);
    buf.extend_from_slice(data);
    // SAFETY: buf holds a complete vfio_irq_set (4-byte aligned u32 words, the header
    // followed by the payload) of exactly argsz bytes, which the kernel only reads.
    check(unsafe { ioctl_with_ptr(device, VFIO_DEVICE_SET_IRQS(), buf.as_ptr()) }).map(|_| ())
}

/// VFIO_DEVICE_RESET.
pub(crate) fn reset(device: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: the ioctl takes no argument.
    check(unsafe { ioctl(device, VFIO_DEVICE_RESET()) }).map(|_| ())
}

/// VFIO_IOMMU_MAP_DMA, readable and writable.
///
/// # Safety
///
/// `[vaddr, vaddr + size)` must stay mapped in this process, and be accessed only
/// the way memory shared with a device may be, until it is unmapped from the IOMMU.
pub(crate) unsafe fn map_dma(
    container: &impl AsRawFd,
    iova: u64,
    size: u64,
    vaddr: u64,
) -> io::Result<()> {
    let map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    };
    // SAFETY: the kernel reads the borrowed struct; the memory it describes is the
    // caller's responsibility (see above).
    check(unsafe { ioctl_with_ref(container, VFIO_IOMMU_MAP_DMA(), &map) }).map(|_| ())
}

/// VFIO_IOMMU_UNMAP_DMA: returns how many bytes the kernel unmapped.
pub(crate) fn unmap_dma(container: &impl AsRawFd, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: the kernel reads and updates the exclusively borrowed struct (no
    // dirty-bitmap flag, so no payload follows it).
    check(unsafe { ioctl_with_mut_ref(container, VFIO_IOMMU_UNMAP_DMA(), &mut unmap) })?;
    Ok(unmap.size)
}
