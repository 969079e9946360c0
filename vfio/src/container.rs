//! The VFIO container and the groups attached to it: one IOMMU address space that a
//! VMM's passed-through devices share.
//!
//! Order of use, as in cloud-hypervisor: open (or adopt) the container, attach each
//! device's group (the first attach selects the type1 IOMMU), open the devices, then
//! map all guest memory with IOVA = guest-physical address.
//!
//! Both forms are supported: opening `<dev>/vfio/vfio` and `<dev>/vfio/<group>`
//! by path, or adopting descriptors that init opened and passed to the VMM
//! ([`Container::from_fd`], [`Container::adopt_group`]), so that the VMM needs no
//! path on the host. A group's character device can be open only once at a time:
//! a second opener gets EBUSY, reported as [`VfioError::DeviceInUse`].

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_GROUP_FLAGS_CONTAINER_SET, VFIO_GROUP_FLAGS_VIABLE,
};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::bdf::Bdf;
use crate::device::Device;
use crate::error::{Result, VfioError};
use crate::group::group_viable;
use crate::ioctls;
use crate::sysfs::SysfsRoot;

/// An attached IOMMU group.
struct Group {
    id: u32,
    file: File,
}

/// An open VFIO container with its attached groups. Dropping it closes the groups,
/// which detaches them (devices still open keep their group alive in the kernel).
pub struct Container {
    file: File,
    groups: Vec<Group>,
}

fn ioctl_err(op: &'static str) -> impl FnOnce(io::Error) -> VfioError {
    move |source| VfioError::Ioctl { op, source }
}

impl Container {
    /// Opens `<dev>/vfio/vfio` (see [`SysfsRoot::with_dev_root`]).
    pub fn open(root: &SysfsRoot) -> Result<Self> {
        Self::from_fd(open_container_fd(root)?)
    }

    /// Adopts an open `/dev/vfio/vfio` descriptor (passed by init).
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        Self::from_file(File::from(fd))
    }

    fn from_file(file: File) -> Result<Self> {
        let version = ioctls::get_api_version(&file).map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(VfioError::Ioctl {
                op: "VFIO_GET_API_VERSION",
                source: io::Error::other(format!(
                    "kernel VFIO API version {version}, expected {VFIO_API_VERSION}"
                )),
            });
        }
        let type1v2 = ioctls::check_extension(&file, VFIO_TYPE1v2_IOMMU)
            .map_err(ioctl_err("VFIO_CHECK_EXTENSION"))?;
        if !type1v2 {
            return Err(VfioError::Ioctl {
                op: "VFIO_CHECK_EXTENSION",
                source: io::Error::other(
                    "the kernel lacks the type1v2 IOMMU backend (load vfio_iommu_type1)",
                ),
            });
        }
        Ok(Container {
            file,
            groups: Vec::new(),
        })
    }

    /// Opens `<dev>/vfio/<group>` and attaches it. EBUSY (another process holds the
    /// group) is [`VfioError::DeviceInUse`]; a group that is not viable is
    /// [`VfioError::GroupNotViable`] naming the members on host drivers.
    pub fn open_group(&mut self, root: &SysfsRoot, group: u32) -> Result<()> {
        if self.groups.iter().any(|g| g.id == group) {
            return Ok(());
        }
        let file = File::from(open_group_fd(root, group)?);
        match self.attach(group, file) {
            Err(VfioError::GroupNotViable { .. }) => {
                // Name the offending members if sysfs can tell.
                group_viable(root, group)?;
                Err(VfioError::GroupNotViable {
                    group,
                    members: Vec::new(),
                })
            }
            other => other,
        }
    }

    /// Adopts an open `/dev/vfio/<group>` descriptor (passed by init) and attaches
    /// it. The group must not be attached to a container yet.
    pub fn adopt_group(&mut self, group: u32, fd: OwnedFd) -> Result<()> {
        if self.groups.iter().any(|g| g.id == group) {
            return Err(VfioError::DeviceInUse {
                what: format!("IOMMU group {group}"),
                detail: "this container already holds it".to_string(),
            });
        }
        self.attach(group, File::from(fd))
    }

    fn attach(&mut self, id: u32, file: File) -> Result<()> {
        let flags = ioctls::group_status(&file).map_err(ioctl_err("VFIO_GROUP_GET_STATUS"))?;
        if flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            // The kernel's word is final; sysfs, where it can be read, names who is in the
            // way (a descriptor handed over by init comes without its sysfs root).
            let members = match group_viable(&SysfsRoot::host(), id) {
                Err(VfioError::GroupNotViable { members, .. }) => members,
                _ => Vec::new(),
            };
            return Err(VfioError::GroupNotViable { group: id, members });
        }
        if flags & VFIO_GROUP_FLAGS_CONTAINER_SET != 0 {
            return Err(VfioError::DeviceInUse {
                what: format!("IOMMU group {id}"),
                detail: "it is already attached to a container".to_string(),
            });
        }
        ioctls::group_set_container(&file, self.file.as_raw_fd())
            .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))?;
        if self.groups.is_empty() {
            // The IOMMU model is chosen once, after the first group is attached.
            // On failure `file` is dropped, which detaches the group again.
            ioctls::set_iommu(&self.file, VFIO_TYPE1v2_IOMMU).map_err(|source| {
                VfioError::Ioctl {
                    op: "VFIO_SET_IOMMU (type1v2; EPERM here usually means no interrupt \
                         remapping: see docs/vfio.md)",
                    source,
                }
            })?;
        }
        log::debug!("attached IOMMU group {id} to the container");
        self.groups.push(Group { id, file });
        Ok(())
    }

    /// The attached groups and their descriptors. A VMM registers each with KVM's
    /// VFIO pseudo-device (`KVM_DEV_VFIO_GROUP_ADD`) so KVM can handle
    /// non-coherent DMA.
    pub fn groups(&self) -> Vec<(u32, BorrowedFd<'_>)> {
        self.groups.iter().map(|g| (g.id, g.file.as_fd())).collect()
    }

    /// The path form in one call: checks that `bdf` is bound to vfio-pci and that its
    /// group is viable, opens and attaches the group (if not yet attached), and opens
    /// the device.
    pub fn attach_device(&mut self, root: &SysfsRoot, bdf: Bdf) -> Result<Device> {
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
        self.open_group(root, group)?;
        self.open_device(bdf)
    }

    /// Opens device `bdf` from whichever attached group holds it.
    pub fn open_device(&self, bdf: Bdf) -> Result<Device> {
        let name = CString::new(bdf.to_string()).map_err(|_| VfioError::InvalidBdf {
            input: bdf.to_string(),
            reason: "contains NUL",
        })?;
        for group in &self.groups {
            match ioctls::group_get_device_fd(&group.file, &name) {
                Ok(fd) => return Device::from_fd(bdf, fd),
                // Not in this group.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV)) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(VfioError::DeviceInUse {
                        what: bdf.to_string(),
                        detail: "the device is already open".to_string(),
                    })
                }
                Err(source) => {
                    return Err(VfioError::Ioctl {
                        op: "VFIO_GROUP_GET_DEVICE_FD",
                        source,
                    })
                }
            }
        }
        Err(VfioError::NotInContainer {
            bdf,
            groups: self.groups.iter().map(|g| g.id).collect(),
        })
    }

    /// Maps `size` bytes of this process's memory at `host_addr` into the IOMMU at
    /// `iova`, readable and writable by the devices. Needs a group attached first.
    ///
    /// # Safety
    ///
    /// Devices may read and write the range at any time until [`Self::unmap_dma`]
    /// is called with the same `iova` and `size`: until then the range must stay
    /// mapped, and it must only be accessed the way guest memory is (raw or volatile
    /// access, never Rust references).
    pub unsafe fn map_dma(&self, iova: u64, size: u64, host_addr: *mut u8) -> Result<()> {
        if self.groups.is_empty() {
            return Err(VfioError::Ioctl {
                op: "VFIO_IOMMU_MAP_DMA",
                source: io::Error::other("no IOMMU group attached to the container yet"),
            });
        }
        // SAFETY: the caller upholds this function's contract, which is map_dma's.
        unsafe { ioctls::map_dma(&self.file, iova, size, host_addr as u64) }.map_err(|source| {
            VfioError::Ioctl {
                op: if source.raw_os_error() == Some(libc::ENOMEM) {
                    "VFIO_IOMMU_MAP_DMA (ENOMEM: RLIMIT_MEMLOCK too low? see check_memlock)"
                } else {
                    "VFIO_IOMMU_MAP_DMA"
                },
                source,
            }
        })
    }

    /// Removes the mapping made by [`Self::map_dma`] with the same `iova` and `size`.
    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<()> {
        let done =
            ioctls::unmap_dma(&self.file, iova, size).map_err(ioctl_err("VFIO_IOMMU_UNMAP_DMA"))?;
        if done != size {
            return Err(VfioError::Ioctl {
                op: "VFIO_IOMMU_UNMAP_DMA",
                source: io::Error::other(format!("unmapped {done} bytes of {size}")),
            });
        }
        Ok(())
    }

    /// Maps every region of `mem` with IOVA = guest-physical address.
    ///
    /// # Safety
    ///
    /// As for [`Self::map_dma`], for every region of `mem`: the memory must stay
    /// mapped while the IOMMU maps it and be accessed only through vm-memory's
    /// volatile accessors. On error some regions may be mapped; do not start the VM.
    pub unsafe fn map_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        for region in mem.iter() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| VfioError::Ioctl {
                    op: "VFIO_IOMMU_MAP_DMA (guest memory)",
                    source: io::Error::other(e.to_string()),
                })?;
            // SAFETY: the caller upholds map_dma's contract for every region.
            unsafe { self.map_dma(region.start_addr().raw_value(), region.len(), host)? };
        }
        Ok(())
    }

    /// Removes the mappings made by [`Self::map_guest_memory`] for the same `mem`.
    pub fn unmap_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        for region in mem.iter() {
            self.unmap_dma(region.start_addr().raw_value(), region.len())?;
        }
        Ok(())
    }
}

/// Opens `<dev>/vfio/vfio` for handing to a VMM ([`Container::from_fd`]).
pub fn open_container_fd(root: &SysfsRoot) -> Result<OwnedFd> {
    let path = root.vfio_container_node();
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map(OwnedFd::from)
        .map_err(|e| VfioError::io(&path, e))
}

/// Opens `<dev>/vfio/<group>` for handing to a VMM ([`Container::adopt_group`]).
/// While that descriptor (or the VMM's copy) is open, nobody else can open the
/// group: a second request gets [`VfioError::DeviceInUse`].
pub fn open_group_fd(root: &SysfsRoot, group: u32) -> Result<OwnedFd> {
    let path = root.vfio_group_node(group);
    match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => Ok(OwnedFd::from(f)),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(VfioError::DeviceInUse {
            what: path.display().to_string(),
            detail: format!("IOMMU group {group} is already open (held by a VMM)"),
        }),
        Err(e) => Err(VfioError::io(&path, e)),
    }
}

impl AsRawFd for Container {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
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
            io::Error::last_os_error(),
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
