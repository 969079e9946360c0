//! The VFIO container: one IOMMU address space that a VMM's devices share.
//!
//! A thin owner of vfio-ioctls' [`VfioContainer`]. The VMM opens one container, opens
//! its passed-through devices into it ([`crate::Device::open`], which attaches each
//! device's group and, with the first group, selects the type1 IOMMU), and then maps
//! all guest memory for DMA with IOVA = guest-physical address, as cloud-hypervisor
//! does. Mapping pins the memory: see [`check_memlock`].
//!
//! vfio-ioctls 0.10 opens `/dev/vfio/vfio` and `/dev/vfio/<group>` by those fixed
//! paths; it has no way to adopt descriptors opened elsewhere in the legacy
//! container/group mode. A VMM in a jail therefore needs those two nodes in its own
//! `/dev/vfio` (made by init like `/dev/kvm`), not passed fds.

use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDeviceFd, VfioOps};
use vm_memory::GuestMemoryBackend;

use crate::error::{Result, VfioError};

/// An open VFIO container (`/dev/vfio/vfio`).
pub struct Container {
    inner: Arc<VfioContainer>,
}

impl Container {
    /// Opens `/dev/vfio/vfio` and checks the API version and type1v2 IOMMU support.
    ///
    /// `kvm_vfio` is KVM's VFIO pseudo-device (`VmFd::create_device` with
    /// `KVM_DEV_TYPE_VFIO`, wrapped by [`VfioDeviceFd::new_from_kvm`]). With it, every
    /// group attached to this container is also registered with KVM, which KVM uses
    /// to handle non-coherent DMA correctly; `None` skips that.
    pub fn open(kvm_vfio: Option<Arc<VfioDeviceFd>>) -> Result<Self> {
        let inner = VfioContainer::new(kvm_vfio).map_err(|source| VfioError::Ioctl {
            op: "opening the container /dev/vfio/vfio",
            source,
        })?;
        Ok(Container {
            inner: Arc::new(inner),
        })
    }

    /// Maps `size` bytes of this process's memory at `host_addr` into the IOMMU at
    /// `iova`, readable and writable by the devices in this container. Needs at
    /// least one device opened first (the IOMMU type is chosen when the first group
    /// is attached).
    ///
    /// # Safety
    ///
    /// Devices may read and write the range at any time until [`Self::unmap_dma`]
    /// is called with the same `iova` and `size`: until then the range must stay
    /// mapped, and the caller must not hold Rust references into it (only raw or
    /// volatile access, as for guest memory). This is vfio-ioctls'
    /// `VfioContainer::vfio_dma_map` contract.
    pub unsafe fn map_dma(&self, iova: u64, size: usize, host_addr: *mut u8) -> Result<()> {
        // SAFETY: the caller upholds vfio_dma_map's contract, which is this
        // function's documented contract.
        unsafe { self.inner.vfio_dma_map(iova, size, host_addr) }.map_err(|source| {
            VfioError::Ioctl {
                op: "VFIO_IOMMU_MAP_DMA",
                source,
            }
        })
    }

    /// Removes the mapping made by [`Self::map_dma`] with the same `iova` and `size`.
    pub fn unmap_dma(&self, iova: u64, size: usize) -> Result<()> {
        self.inner
            .vfio_dma_unmap(iova, size)
            .map_err(|source| VfioError::Ioctl {
                op: "VFIO_IOMMU_UNMAP_DMA",
                source,
            })
    }

    /// Maps every region of `mem` with IOVA = guest-physical address.
    ///
    /// # Safety
    ///
    /// As for [`Self::map_dma`], for every region of `mem`: the memory must outlive
    /// the mapping and must only be accessed the way guest memory is (vm-memory's
    /// volatile accessors), never through Rust references. If this fails, some
    /// regions may be mapped; the VM must not be started.
    pub unsafe fn map_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        // SAFETY: the caller upholds vfio_map_guest_memory's contract, which is this
        // function's documented contract.
        unsafe { self.inner.vfio_map_guest_memory(mem) }.map_err(|source| VfioError::Ioctl {
            op: "mapping guest memory (VFIO_IOMMU_MAP_DMA)",
            source,
        })
    }

    /// Removes the mappings made by [`Self::map_guest_memory`] for the same `mem`.
    pub fn unmap_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        self.inner
            .vfio_unmap_guest_memory(mem)
            .map_err(|source| VfioError::Ioctl {
                op: "unmapping guest memory (VFIO_IOMMU_UNMAP_DMA)",
                source,
            })
    }

    /// The vfio-ioctls container, for calls this wrapper does not cover.
    pub fn vfio_container(&self) -> &Arc<VfioContainer> {
        &self.inner
    }

    /// The container as vfio-ioctls' [`VfioOps`], as `VfioDevice::new` wants it.
    pub(crate) fn ops(&self) -> Arc<dyn VfioOps> {
        self.inner.clone()
    }
}

/// Checks that this process may pin `need` bytes: type1 pins every DMA-mapped page
/// and counts it against `RLIMIT_MEMLOCK` unless the process has `CAP_IPC_LOCK`.
/// Call it before mapping guest memory, with the guest's RAM size, to get a clear
/// error instead of a bare ENOMEM from the ioctl.
pub fn check_memlock(need: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively borrowed struct.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 {
        return Err(VfioError::io(
            "getrlimit(RLIMIT_MEMLOCK)",
            std::io::Error::last_os_error(),
        ));
    }
    if limit.rlim_cur == libc::RLIM_INFINITY || limit.rlim_cur >= need {
        return Ok(());
    }
    if has_cap_ipc_lock()? {
        return Ok(());
    }
    Err(VfioError::MemlockTooLow {
        need,
        have: limit.rlim_cur,
    })
}

/// Whether CAP_IPC_LOCK is in this process's effective set (`CapEff` in
/// `/proc/self/status`).
fn has_cap_ipc_lock() -> Result<bool> {
    const CAP_IPC_LOCK: u32 = 14;
    let path = "/proc/self/status";
    let status = std::fs::read_to_string(path).map_err(|e| VfioError::io(path, e))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    Ok(eff & (1 << CAP_IPC_LOCK) != 0)
}
