//! Putting `--vfio` devices into a VM: one VFIO container for the whole VM, every region of
//! guest memory mapped into its IOMMU with IOVA = guest-physical address (so the guest's
//! driver programs guest-physical addresses for DMA, as on hardware without a vIOMMU), the
//! groups registered with KVM's VFIO pseudo-device, each device reset (when it can be) and
//! placed on the PCI bus. At VM end: interrupts off, reset, DMA unmapped.
//!
//! Two ways in: by path (`--vfio <bdf>`: the device must already be bound to vfio-pci and its
//! group viable; a group another VMM holds gives `DeviceInUse`), or from descriptors the parent
//! opened (`--vfio-container-fd` + `--vfio-group-fd`, with `--vfio <bdf>` naming the devices).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use bulkhead_vfio::{Bdf, Container, SysfsRoot};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_GROUP,
    KVM_DEV_VFIO_GROUP_ADD,
};
use kvm_ioctls::DeviceFd;

use super::passthrough::VfioPciDevice;
use crate::config::FdTaker;
use crate::vm::Vm;
use crate::vstate::memory::GuestMemoryMmap;

/// The GSI of every passed-through function's INTx: the DSDT's `_PRT` routes every PCI
/// interrupt pin there (a shared level-triggered line; KVM keeps one resampler per irqfd).
const INTX_GSI: u8 = crate::boot::layout::PCI_INTX_GSI as u8;

/// What to pass through.
#[derive(Debug, Default)]
pub struct VfioRequest {
    /// The functions, e.g. `0000:00:03.0`.
    pub devices: Vec<Bdf>,
    /// An open `/dev/vfio/vfio`; `None`: open it by path.
    pub container_fd: Option<OwnedFd>,
    /// Open `/dev/vfio/<group>` descriptors; empty: open the groups by path.
    pub group_fds: Vec<OwnedFd>,
}

impl VfioRequest {
    /// Builds a request from command-line values; descriptors are taken from `fds`.
    pub fn from_args(
        devices: &[String],
        container_fd: Option<RawFd>,
        group_fds: &[RawFd],
        fds: &mut FdTaker,
    ) -> Result<Self, String> {
        let devices = devices
            .iter()
            .map(|d| d.parse::<Bdf>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let container_fd = match container_fd {
            Some(fd) => Some(fds.take(fd).map_err(|e| e.to_string())?),
            None => None,
        };
        let group_fds = group_fds
            .iter()
            .map(|fd| fds.take(*fd).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            devices,
            container_fd,
            group_fds,
        })
    }
}

/// The passed-through devices of a VM and the container whose IOMMU maps its memory.
pub struct VfioDevices {
    devices: Vec<Arc<Mutex<VfioPciDevice>>>,
    by_path: bool,
    _kvm_vfio: Option<DeviceFd>,
    /// Dropped before `mem`: the IOMMU mappings go before the memory can.
    container: Option<Container>,
    mem: GuestMemoryMmap,
}

/// The group number of an open `/dev/vfio/<n>` descriptor: as init names it
/// (`BULKHEAD_VFIO_GROUP_IDS`, in the order of `BULKHEAD_VFIO_GROUP_FDS`: a jailed VMM has no
/// /proc), else from its /proc link.
fn group_number(fd: &OwnedFd) -> Result<u32, String> {
    if let (Ok(fds), Ok(ids)) = (
        std::env::var("BULKHEAD_VFIO_GROUP_FDS"),
        std::env::var("BULKHEAD_VFIO_GROUP_IDS"),
    ) {
        let me = fd.as_raw_fd().to_string();
        if let Some(id) = fds
            .split(',')
            .zip(ids.split(','))
            .find(|(f, _)| *f == me)
            .and_then(|(_, id)| id.parse().ok())
        {
            return Ok(id);
        }
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("vfio group fd {}: {e}", fd.as_raw_fd()))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "vfio group fd {} is {}, not /dev/vfio/<group>",
                fd.as_raw_fd(),
                link.display()
            )
        })
}

/// KVM's VFIO pseudo-device with every group added (lets KVM honour non-coherent DMA).
fn kvm_vfio_device(vm: &Vm, container: &Container) -> Result<DeviceFd, String> {
    let mut create = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    let dev = vm
        .vm_fd()
        .create_device(&mut create)
        .map_err(|e| format!("KVM_CREATE_DEVICE (VFIO): {e}"))?;
    for (id, fd) in container.groups() {
        let raw: RawFd = fd.as_raw_fd();
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_GROUP,
            attr: u64::from(KVM_DEV_VFIO_GROUP_ADD),
            addr: &raw as *const RawFd as u64,
        };
        dev.set_device_attr(&attr)
            .map_err(|e| format!("KVM_DEV_VFIO_GROUP_ADD (group {id}): {e}"))?;
    }
    Ok(dev)
}

impl VfioDevices {
    /// Opens the container and devices of `req` and puts the devices on `vm`'s PCI bus.
    pub fn attach(vm: &mut Vm, req: VfioRequest) -> Result<Self, String> {
        let policy_vm = std::env::var("BULKHEAD_VM").ok();
        if let Some(why) = policy_refusal(policy_vm.as_deref(), &req) {
            return Err(why);
        }
        let root = SysfsRoot::host();
        let by_path = req.group_fds.is_empty();
        let mut container = match req.container_fd {
            Some(fd) => Container::from_fd(fd),
            None => Container::open(&root),
        }
        .map_err(|e| e.to_string())?;
        for fd in req.group_fds {
            let id = group_number(&fd)?;
            container.adopt_group(id, fd).map_err(|e| e.to_string())?;
            log::info!("bulkhead-vmm: vfio: IOMMU group {id} from a handed-over descriptor");
        }
        let mut opened = Vec::new();
        for bdf in &req.devices {
            let dev = if by_path {
                container.attach_device(&root, *bdf)
            } else {
                container.open_device(*bdf)
            }
            .map_err(|e| format!("cannot pass {bdf} through: {e}"))?;
            opened.push(Arc::new(dev));
        }
        let mem = vm.memory().clone();
        let ram: u64 = vm_memory::GuestMemoryBackend::iter(&mem)
            .map(vm_memory::GuestMemoryRegion::len)
            .sum();
        bulkhead_vfio::check_memlock(ram).map_err(|e| e.to_string())?;
        // SAFETY: `mem` (a clone sharing the same mappings) is kept in the returned value and
        // outlives the container (field order; `finish` unmaps first); guest memory is only
        // ever accessed through vm-memory's volatile accessors.
        unsafe { container.map_guest_memory(&mem) }.map_err(|e| e.to_string())?;
        log::info!(
            "bulkhead-vmm: vfio: {ram:#x} bytes of guest memory mapped for DMA (IOVA = GPA)"
        );
        let kvm_vfio = match kvm_vfio_device(vm, &container) {
            Ok(d) => Some(d),
            Err(e) => {
                log::warn!("bulkhead-vmm: vfio: {e} (continuing without it)");
                None
            }
        };
        let mut devices = Vec::new();
        for dev in opened {
            let bdf = dev.bdf();
            if dev.can_reset() {
                dev.reset()
                    .map_err(|e| format!("{bdf}: reset at VM start: {e}"))?;
                log::info!("bulkhead-vmm: vfio {bdf}: reset at VM start");
            } else {
                log::info!("bulkhead-vmm: vfio {bdf}: no reset method; not reset at VM start");
            }
            let routing = vm.irq_routing().clone();
            let slots = vm.memory_slots().clone();
            let pci = VfioPciDevice::new(dev, vm.bar_allocator(), &slots, &routing, INTX_GSI)
                .map_err(|e| e.to_string())?;
            let pci = Arc::new(Mutex::new(pci));
            vm.add_pci_device(pci.clone()).map_err(|e| e.to_string())?;
            devices.push(pci);
        }
        Ok(Self {
            devices,
            by_path,
            _kvm_vfio: kvm_vfio,
            container: Some(container),
            mem,
        })
    }

    /// At VM end: interrupts off, reset where possible, DMA unmapped, container closed; then
    /// reports whether each device is still bound to vfio-pci on the host (it must be: nothing
    /// hands a device back to a host driver implicitly). Dropping does the same, so a VMM
    /// that ends on an error path leaves no device unreset and no DMA mapping behind.
    pub fn finish(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if self.container.is_none() {
            return; // released already
        }
        let mut bdfs = Vec::new();
        for d in &self.devices {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.shutdown();
            bdfs.push(d.device().bdf());
        }
        if let Some(c) = self.container.take() {
            if let Err(e) = c.unmap_guest_memory(&self.mem) {
                log::warn!("bulkhead-vmm: vfio: unmapping guest memory: {e}");
            }
        }
        if !self.by_path {
            return;
        }
        let root = SysfsRoot::host();
        for bdf in bdfs {
            match root.function(bdf) {
                Ok(f) if f.is_bound_to_vfio_pci() => {
                    log::info!("bulkhead-vmm: vfio {bdf}: released, still bound to vfio-pci")
                }
                Ok(f) => log::warn!(
                    "bulkhead-vmm: vfio {bdf}: released, bound to {}",
                    f.driver.as_deref().unwrap_or("no driver")
                ),
                Err(e) => log::warn!("bulkhead-vmm: vfio {bdf}: {e}"),
            }
        }
    }
}

impl Drop for VfioDevices {
    fn drop(&mut self) {
        self.release();
    }
}

/// A VMM that init started for a VM of the policy (`BULKHEAD_VM` set) passes through only
/// what init handed it, the devices the policy grants that VM. Opening `/dev/vfio` by path
/// instead would go around the policy, so it is refused.
pub fn policy_refusal(vm: Option<&str>, req: &VfioRequest) -> Option<String> {
    let vm = vm?;
    if req.devices.is_empty() || !req.group_fds.is_empty() {
        return None;
    }
    let bdfs: Vec<String> = req.devices.iter().map(|b| b.to_string()).collect();
    Some(format!(
        "vm {vm}: cannot pass {} through: the policy grants this VM no PCI device (init \
         handed over no VFIO descriptors)",
        bdfs.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, VmConfig};

    #[test]
    fn command_line_forms() {
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--vfio",
            "0000:00:03.0",
            "--vfio",
            "0000:00:04.0",
        ])
        .unwrap();
        let v = VmConfig::from(c);
        assert_eq!(v.vfio, ["0000:00:03.0", "0000:00:04.0"]);
        assert!(v.vfio_container_fd.is_none() && v.vfio_group_fds.is_empty());
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--vfio",
            "0000:00:03.0",
            "--vfio-container-fd",
            "5",
            "--vfio-group-fd",
            "6",
        ])
        .unwrap();
        let v = VmConfig::from(c);
        assert_eq!((v.vfio_container_fd, v.vfio_group_fds), (Some(5), vec![6]));
        // Descriptors without the devices they are for, or a group without its container.
        assert!(
            Cli::try_parse_from(["bulkhead-vmm", "--kernel", "k", "--vfio-container-fd", "5"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--vfio",
            "0000:00:03.0",
            "--vfio-group-fd",
            "6"
        ])
        .is_err());
    }

    #[test]
    fn descriptors_also_come_from_the_environment_init_sets() {
        use clap::CommandFactory;
        // Checked on the parser's definition: setting the variables would leak into every
        // other test parsing a command line in this process.
        let cmd = Cli::command();
        let env_of = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(
            env_of("vfio_container_fd").as_deref(),
            Some("BULKHEAD_VFIO_CONTAINER_FD")
        );
        assert_eq!(
            env_of("vfio_group_fd").as_deref(),
            Some("BULKHEAD_VFIO_GROUP_FDS")
        );
        // The list form init uses for several groups.
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--vfio",
            "0000:00:03.0",
            "--vfio-container-fd",
            "5",
            "--vfio-group-fd",
            "6,7",
        ])
        .unwrap();
        assert_eq!(VmConfig::from(c).vfio_group_fds, vec![6, 7]);
    }

    #[test]
    fn bad_addresses_and_descriptors_are_refused_before_anything_opens() {
        let mut fds = FdTaker::default();
        let e = VfioRequest::from_args(&["00:03".into()], None, &[], &mut fds).unwrap_err();
        assert!(e.contains("invalid PCI address"), "{e}");
        let e = VfioRequest::from_args(&["0000:00:03.0".into()], Some(9999), &[], &mut fds)
            .unwrap_err();
        assert!(e.contains("9999"), "{e}");
        let r = VfioRequest::from_args(&["0000:00:03.0".into()], None, &[], &mut fds).unwrap();
        assert_eq!(r.devices, ["0000:00:03.0".parse::<Bdf>().unwrap()]);
    }

    #[test]
    fn group_number_comes_from_the_descriptor_path() {
        let f = tempfile::tempfile().unwrap();
        let e = group_number(&OwnedFd::from(f)).unwrap_err();
        assert!(e.contains("not /dev/vfio/<group>"), "{e}");
    }

    #[test]
    fn a_vm_of_the_policy_passes_through_only_what_init_handed_it() {
        let edu: Bdf = "0000:00:03.0".parse().unwrap();
        let by_path = VfioRequest {
            devices: vec![edu],
            container_fd: None,
            group_fds: Vec::new(),
        };
        // Started by init for a VM, asking by path: refused, and the reason names it.
        let why = policy_refusal(Some("second-vm"), &by_path).unwrap();
        assert!(
            why.contains("vm second-vm") && why.contains("0000:00:03.0"),
            "{why}"
        );
        assert!(why.contains("grants this VM no PCI device"), "{why}");
        // Not a VM of the policy (a VMM run by hand), or no device: not this check's business.
        assert_eq!(policy_refusal(None, &by_path), None);
        let none = VfioRequest {
            devices: Vec::new(),
            container_fd: None,
            group_fds: Vec::new(),
        };
        assert_eq!(policy_refusal(Some("vm"), &none), None);
        // With descriptors from init: allowed here (the kernel decides which devices they
        // reach).
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let handed = VfioRequest {
            devices: vec![edu],
            container_fd: None,
            group_fds: vec![OwnedFd::from(a)],
        };
        assert_eq!(policy_refusal(Some("edu-vm"), &handed), None);
    }
}
