//! Bulkhead's host side of PCI passthrough.
//!
//! - [`sysfs`]: PCI functions as sysfs describes them ([`SysfsRoot`], [`PciFunction`]).
//! - [`group`]: IOMMU groups and whether a VM may have one ([`group_viable`]).
//! - [`bind`]: binding a function to vfio-pci ([`bind_to_vfio_pci`]) and handing it
//!   back only on request ([`release`]).
//! - [`host_critical`]: devices the host needs and will not give away.
//! - [`container`] and [`device`]: the VFIO container, its groups and devices for the
//!   VMM, opened by path or adopted from descriptors init passed.
//!
//! See `docs/vfio.md` for passthrough on real hardware.

pub mod bdf;
pub mod bind;
pub mod container;
pub mod device;
pub mod error;
pub mod group;
pub mod host_critical;
mod ioctls;
pub mod sysfs;

pub use bdf::Bdf;
pub use bind::{
    bind_to_vfio_pci, bind_to_vfio_pci_with, ensure_group_free, release, release_with, BindOptions,
    BindReport, KernelHook, RealKernel, ReleaseReport,
};
pub use container::{check_memlock, open_container_fd, open_group_fd, Container};
pub use device::{Device, IrqInfo, MappedArea, RegionInfo};
pub use error::{GroupMember, Result, VfioError};
pub use group::{group_members, group_viable, GroupEntry};
pub use host_critical::host_critical_reason;
pub use sysfs::{PciFunction, SysfsRoot, VFIO_PCI_DRIVER};
