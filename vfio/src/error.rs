//! The one error type of this crate.

use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

use crate::bdf::Bdf;

/// A member of an IOMMU group that keeps the group from being used by a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The sysfs name of the member: a PCI address for PCI functions.
    pub name: String,
    /// The driver the member is bound to, if any.
    pub driver: Option<String>,
}

/// Everything that can go wrong on the host side of passthrough.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A PCI address that does not parse.
    #[error("invalid PCI address {input:?}: {reason} (expected the form 0000:00:03.0)")]
    InvalidBdf {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The kernel has no IOMMU, so it made no IOMMU groups and VFIO cannot be used.
    #[error(
        "the kernel has no IOMMU ({path} is missing or empty): enable VT-d/AMD-Vi in the \
         firmware and boot with intel_iommu=on on Intel (AMD's IOMMU is on unless \
         amd_iommu=off); under QEMU use -M q35 -device intel-iommu"
    )]
    NoIommu {
        /// The directory that lists IOMMU groups.
        path: PathBuf,
    },

    /// No PCI function with this address exists.
    #[error("PCI function {bdf} does not exist ({path} not found)")]
    DeviceMissing {
        /// The address asked for.
        bdf: Bdf,
        /// Where it was looked for.
        path: PathBuf,
    },

    /// The function exists but the IOMMU did not put it in a group.
    #[error("PCI function {bdf} has no IOMMU group ({path} is missing)")]
    NoGroup {
        /// The function.
        bdf: Bdf,
        /// The missing `iommu_group` link.
        path: PathBuf,
    },

    /// The kernel has no IOMMU group with this number.
    #[error("IOMMU group {group} does not exist ({path} not found)")]
    GroupMissing {
        /// The group number.
        group: u32,
        /// Where it was looked for.
        path: PathBuf,
    },

    /// Some member of the group is bound to a host driver, so the group cannot be
    /// handed to a VM.
    #[error(
        "IOMMU group {group} is not viable: every function in it must be bound to vfio-pci \
         or to no driver, but {}",
        describe_members(members)
    )]
    GroupNotViable {
        /// The group number.
        group: u32,
        /// The members that stand in the way.
        members: Vec<GroupMember>,
    },

    /// The device or its group is already owned by someone else (the group's
    /// character device answered EBUSY, or a VMM holds it open).
    #[error("{what} is in use: {detail}")]
    DeviceInUse {
        /// What is busy (a group device node or a function).
        what: String,
        /// Who or what holds it, as far as is known.
        detail: String,
    },

    /// The host needs this device; giving it to a VM would break the host.
    #[error("refusing to pass through {bdf}: {reason}")]
    HostCritical {
        /// The function.
        bdf: Bdf,
        /// Why the host needs it.
        reason: String,
    },

    /// The vfio-pci driver is not registered (module not loaded).
    #[error(
        "the vfio-pci driver is not loaded ({path} is missing): load irqbypass, vfio, \
         vfio_iommu_type1, vfio_virqfd, vfio-pci-core and vfio-pci first"
    )]
    VfioPciMissing {
        /// The driver directory that was expected.
        path: PathBuf,
    },

    /// The kernel did not do what a sysfs write asked for.
    #[error("binding {bdf} to vfio-pci failed: {detail}")]
    BindFailed {
        /// The function.
        bdf: Bdf,
        /// What was observed instead.
        detail: String,
    },

    /// A sysfs attribute held something this crate cannot parse.
    #[error("unexpected contents in {path}: {value:?} ({reason})")]
    Malformed {
        /// The attribute.
        path: PathBuf,
        /// What it held.
        value: String,
        /// What was expected.
        reason: &'static str,
    },

    /// The process may lock less memory than the DMA mappings need.
    #[error(
        "RLIMIT_MEMLOCK is {have} bytes but {need} bytes of guest memory must be pinned for \
         DMA: raise the limit (setrlimit/ulimit -l) or grant CAP_IPC_LOCK"
    )]
    MemlockTooLow {
        /// Bytes needed.
        need: u64,
        /// Current soft limit in bytes.
        have: u64,
    },

    /// A region index or range outside what the device reported.
    #[error("region {index} access at offset {offset:#x} of {len} bytes is out of bounds (region size {size:#x})")]
    RegionOutOfBounds {
        /// Region index.
        index: u32,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: usize,
        /// Size of the region (0 if the region does not exist).
        size: u64,
    },

    /// A VFIO ioctl failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// No group attached to the container holds this device.
    #[error("{bdf} is in none of the container's IOMMU groups {groups:?}")]
    NotInContainer {
        /// The device.
        bdf: Bdf,
        /// The attached groups.
        groups: Vec<u32>,
    },

    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl VfioError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        VfioError::Io {
            path: path.into(),
            source,
        }
    }
}

fn describe_members(members: &[GroupMember]) -> String {
    if members.is_empty() {
        return "the kernel says one is not (which one could not be read from sysfs)".to_string();
    }
    let mut out = String::new();
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        match &m.driver {
            Some(d) => {
                let _ = write!(out, "{} is bound to {}", m.name, d);
            }
            None => {
                let _ = write!(out, "{} is not bound", m.name);
            }
        }
    }
    out
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, VfioError>;
