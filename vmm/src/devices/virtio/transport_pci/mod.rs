//! The virtio-pci modern transport (virtio 1.x, PCI device IDs 0x1040 + type), written once for
//! every virtio device.
//!
//! BAR 0 (32-bit memory, 32 KiB) holds every structure the capabilities point at:
//!
//! | offset | structure                                        |
//! |--------|--------------------------------------------------|
//! | 0x0000 | common configuration                             |
//! | 0x1000 | ISR status                                       |
//! | 0x2000 | device-specific configuration                   |
//! | 0x3000 | notifications: queue N at 0x3000 + 4 N (an ioeventfd each) |
//! | 0x4000 | MSI-X table (queues + 1 vectors)                 |
//! | 0x5000 | MSI-X pending bits                               |
//!
//! Interrupts are MSI-X only (no INTx): each vector is an irqfd on its own GSI. A vector
//! number the device does not have reads back as `VIRTIO_MSI_NO_VECTOR`.
//!
//! BAR 0 decodes only while the command register's memory-space bit is set (it is clear at
//! power-on; the guest's PCI core sets it before a driver starts, and may clear it while it
//! sizes BARs): otherwise reads give all ones, writes are dropped, and the queues'
//! ioeventfds are not registered.
//!
//! A device with shared-memory regions (`VirtioDevice::shm_regions`) also gets BAR 2: 64-bit,
//! prefetchable, in the 64-bit window, holding the regions back to back (each 4 KiB-aligned),
//! one shared-memory capability (cfg_type 8) per region. The bus does not trap BAR 2; the
//! device maps host memory there with KVM memory slots.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioDevice, VirtioInterrupt};
use crate::devices::pci::bar_allocator::{BarAllocError, BarAllocator};
use crate::devices::pci::config_space::{BarKind, BarMove, PciBar, PciConfigSpace, PciHeader};
use crate::devices::pci::device::{BarMapping, PciDevice};
use crate::devices::pci::msix::{self, MsixVectors, MSIX_CAP_ID};
use crate::vstate::irq_routing::{IrqRouting, IrqRoutingError};
use crate::vstate::memory::GuestMemoryMmap;

mod common_cfg;
mod shm;

pub use shm::{shm_bar_size, shm_layout};

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// BAR 0 size.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_LEN: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const MSIX_LEN: u64 = 0x1000;
/// "No vector" in the MSI-X vector fields.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
const VENDOR_CAP_ID: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_SHARED_MEMORY: u8 = 8;
/// The BAR holding shared-memory regions (64-bit, prefetchable, device-mapped).
pub const SHM_BAR: usize = 2;
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Errors building the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No BAR space.
    #[error(transparent)]
    Bar(#[from] BarAllocError),
    /// MSI-X setup failed.
    #[error("MSI-X: {0}")]
    Msix(#[from] IrqRoutingError),
    /// eventfd or ioeventfd failure.
    #[error("queue notification setup: {0}")]
    Notify(String),
    /// Too many queues for the layout.
    #[error("device has too many queues ({0})")]
    TooManyQueues(usize),
}

/// Delivers a device's interrupts through its MSI-X vectors (and the ISR byte).
struct PciInterrupt {
    msix: Arc<MsixVectors>,
    isr: Arc<AtomicU8>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

impl VirtioInterrupt for PciInterrupt {
    fn notify_queue(&self, index: usize) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
        match self.queue_vectors.get(index) {
            Some(&v) if v != VIRTIO_MSI_NO_VECTOR => self.msix.trigger(v),
            _ => log::debug!("bulkhead-vmm: queue {index} has no MSI-X vector"),
        }
    }
    fn notify_config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        if self.config_vector != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(self.config_vector);
        }
    }
}

/// The transport-level state the common configuration exposes.
#[derive(Default)]
struct Common {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    queue_select: u16,
    status: u8,
    config_generation: u8,
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    name: String,
    config: PciConfigSpace,
    msix_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    msix: Arc<MsixVectors>,
    isr: Arc<AtomicU8>,
    common: Common,
    queues: Vec<Queue>,
    queue_vectors: Vec<u16>,
    notify: Vec<EventFd>,
    bar_addr: u64,
    vm: Option<Arc<VmFd>>,
    /// The queues' ioeventfds are registered at `bar_addr` (only while memory decoding is
    /// on).
    ioevents_at: Option<u64>,
    activated: bool,
    /// While the device's reset is finishing (its worker has not exited yet), the status
    /// the guest reads: the one it had. The driver waits for 0 before using the device
    /// again (virtio 1.x §2.1.2, §4.1.4.3.2), and no vCPU ever waits for the worker.
    resetting: Option<u8>,
}

impl VirtioPciDevice {
    /// Puts `device` on PCI: allocates BAR 0 from `bars`, MSI-X vectors from `routing`, and
    /// registers one ioeventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bars: &mut BarAllocator,
        routing: &Arc<IrqRouting>,
    ) -> Result<Self, TransportError> {
        let nq = device.queue_max_sizes().len();
        let msix = MsixVectors::new(Self::vector_count(nq)?, routing.clone())?;
        let addr = bars.allocate_mmio32(BAR_SIZE)?;
        let shm_size = shm_bar_size(&device.shm_regions());
        let shm_addr = match shm_size {
            Some(size) => Some(bars.allocate_mmio64(size)?),
            None => None,
        };
        let mut dev = Self::build(device, mem, msix, addr, shm_addr)?;
        // The ioeventfds are registered when the guest turns memory decoding on.
        dev.vm = Some(routing.vm().clone());
        Ok(dev)
    }

    /// The transport without KVM (no ioeventfds, unrouted MSI-X) at BAR address `addr`: queue
    /// notifications are trapped writes. For tests.
    /// A shared-memory BAR, if the device wants one, is put at `shm_addr`.
    pub fn new_unrouted(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        addr: u64,
        shm_addr: u64,
    ) -> Result<Self, TransportError> {
        let nq = device.queue_max_sizes().len();
        let msix = MsixVectors::new_unrouted(Self::vector_count(nq)?)
            .map_err(|e| TransportError::Notify(e.to_string()))?;
        let shm = shm_bar_size(&device.shm_regions()).map(|_| shm_addr);
        Self::build(device, mem, msix, addr, shm)
    }

    fn vector_count(queues: usize) -> Result<u16, TransportError> {
        // Vectors must fit in the 0x1000-byte table window; the notify area holds 1024 queues.
        if queues == 0 || queues + 1 > (MSIX_LEN / msix::MSIX_ENTRY_SIZE) as usize {
            return Err(TransportError::TooManyQueues(queues));
        }
        Ok(queues as u16 + 1)
    }

    fn build(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msix: MsixVectors,
        addr: u64,
        shm_addr: Option<u64>,
    ) -> Result<Self, TransportError> {
        let sizes = device.queue_max_sizes().to_vec();
        let (class, subclass) = device.pci_class();
        let mut config = PciConfigSpace::new(PciHeader {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device.device_type() as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        let cap_err = |e| TransportError::Notify(format!("config space: {e}"));
        config
            .add_bar(PciBar {
                index: 0,
                addr,
                size: BAR_SIZE,
                kind: BarKind::Mmio32,
                prefetchable: false,
            })
            .map_err(cap_err)?;
        let vendor_cap = |cfg_type: u8, offset: u64, len: u64, extra: Option<u32>| {
            // cap_len, cfg_type, bar, id, padding[2], offset, length [, notify multiplier]
            let cap_len = if extra.is_some() { 20u8 } else { 16u8 };
            let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
            b.extend_from_slice(&(offset as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            if let Some(x) = extra {
                b.extend_from_slice(&x.to_le_bytes());
            }
            b
        };
        for body in [
            vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, None),
            vendor_cap(CAP_ISR, ISR_OFFSET, 1, None),
            vendor_cap(CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, None),
            vendor_cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            ),
        ] {
            config
                .add_capability(VENDOR_CAP_ID, &body, &[])
                .map_err(cap_err)?;
        }
        let shm_specs = device.shm_regions();
        if let (Some(base), Some(size)) = (shm_addr, shm_bar_size(&shm_specs)) {
            config
                .add_bar(PciBar {
                    index: SHM_BAR,
                    addr: base,
                    size,
                    kind: BarKind::Mmio64,
                    prefetchable: true,
                })
                .map_err(cap_err)?;
            for r in shm_layout(&shm_specs, 0) {
                // virtio_pci_cap64: the common fields, then offset_hi and length_hi.
                let mut b = vec![24u8, CAP_SHARED_MEMORY, SHM_BAR as u8, r.id, 0, 0];
                b.extend_from_slice(&(r.guest_addr as u32).to_le_bytes());
                b.extend_from_slice(&(r.size as u32).to_le_bytes());
                b.extend_from_slice(&((r.guest_addr >> 32) as u32).to_le_bytes());
                b.extend_from_slice(&((r.size >> 32) as u32).to_le_bytes());
                config
                    .add_capability(VENDOR_CAP_ID, &b, &[])
                    .map_err(cap_err)?;
            }
            device.set_shm_regions(&shm_layout(&shm_specs, base));
        }
        let (body, mask) = msix::capability(
            msix.count() as u16,
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config
            .add_capability(MSIX_CAP_ID, &body, &mask)
            .map_err(cap_err)?;
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for s in &sizes {
            queues.push(Queue::new(*s).map_err(|e| TransportError::Notify(format!("{e:?}")))?);
            notify.push(
                EventFd::new(EFD_NONBLOCK).map_err(|e| TransportError::Notify(e.to_string()))?,
            );
        }
        Ok(Self {
            name: format!("virtio-{}", device.name()),
            config,
            msix_cap,
            device,
            mem,
            msix: Arc::new(msix),
            isr: Arc::new(AtomicU8::new(0)),
            common: Common {
                msix_config: VIRTIO_MSI_NO_VECTOR,
                ..Default::default()
            },
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; sizes.len()],
            queues,
            notify,
            bar_addr: addr,
            vm: None,
            ioevents_at: None,
            activated: false,
            resetting: None,
        })
    }

    fn register_ioeventfds(&self, base: u64) -> Result<(), TransportError> {
        let Some(vm) = &self.vm else { return Ok(()) };
        for (i, evt) in self.notify.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| TransportError::Notify(format!("ioeventfd at {addr:#x}: {e}")))?;
        }
        Ok(())
    }

    /// Registers the ioeventfds at BAR 0's address while memory decoding is on, and takes
    /// them away while it is off (or from an address BAR 0 left).
    fn sync_ioeventfds(&mut self) {
        let want = self.config.memory_enabled().then_some(self.bar_addr);
        if want == self.ioevents_at {
            return;
        }
        if let Some(old) = self.ioevents_at.take() {
            self.unregister_ioeventfds(old);
        }
        if let Some(new) = want {
            match self.register_ioeventfds(new) {
                Ok(()) => self.ioevents_at = Some(new),
                Err(e) => {
                    // Notifications then arrive as trapped writes (slower, still served).
                    log::warn!("bulkhead-vmm: {}: {e}", self.name);
                    self.unregister_ioeventfds(new);
                }
            }
        }
    }

    /// A vector number as the guest wrote it, or NO_VECTOR if the device has no such vector.
    fn checked_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.count() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn unregister_ioeventfds(&self, base: u64) {
        let Some(vm) = &self.vm else { return };
        for (i, evt) in self.notify.iter().enumerate() {
            let addr = base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            let _ = vm.unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch);
        }
    }

    /// The device status byte the guest reads now (the old one while a reset finishes).
    pub fn status(&mut self) -> u8 {
        if self.reset_finished() {
            self.common.status
        } else {
            self.resetting.unwrap_or(self.common.status)
        }
    }

    /// True unless the device is still finishing a reset. Never waits.
    fn reset_finished(&mut self) -> bool {
        if self.resetting.is_some() {
            if self.device.reset_pending() {
                return false;
            }
            self.resetting = None;
        }
        true
    }

    /// The MSI-X vectors (tests read their eventfds).
    pub fn msix(&self) -> &Arc<MsixVectors> {
        &self.msix
    }
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

impl PciDevice for VirtioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        let mv = self.config.write(reg, offset, data);
        // The command register's memory-space bit may have changed.
        self.sync_ioeventfds();
        // The MSI-X message control word (cap + 2) may have changed.
        let ctrl_reg = (self.msix_cap + 2) / 4;
        if reg == ctrl_reg {
            let ctrl = self.config.read_bytes(self.msix_cap + 2, 2) as u16;
            self.msix.set_control(ctrl);
        }
        mv
    }

    fn bars(&self) -> Vec<(PciBar, BarMapping)> {
        self.config
            .bars()
            .map(|b| {
                let mapping = if b.index == SHM_BAR {
                    BarMapping::DeviceMapped
                } else {
                    BarMapping::Trapped
                };
                (*b, mapping)
            })
            .collect()
    }

    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if index != 0 || !self.config.memory_enabled() {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                let v = self.read_common(o, data.len());
                for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
                    *d = s;
                }
            }
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                let v = self.isr.swap(0, Ordering::SeqCst);
                data.fill(0);
                if let Some(d) = data.first_mut() {
                    *d = v;
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_LEN).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_LEN).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if index != 0 || !self.config.memory_enabled() {
            return;
        }
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o, le_value(data)),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Only reached without an ioeventfd (tests, or a BAR the guest moved badly).
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.notify.get(q) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_LEN).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, mv: &BarMove) -> Result<(), String> {
        if mv.index == SHM_BAR {
            let regions = shm_layout(&self.device.shm_regions(), mv.new);
            self.device.set_shm_regions(&regions);
            return Ok(());
        }
        if mv.index != 0 {
            return Ok(());
        }
        self.bar_addr = mv.new;
        self.sync_ioeventfds();
        Ok(())
    }
}
