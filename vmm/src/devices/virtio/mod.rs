//! Virtio: the device trait every virtio device implements, the one PCI transport they plug
//! into (`transport_pci`), the queue worker thread they share, and the devices.
//!
//! To add a device: copy `rng/`, give it a device type, features, config space and queue
//! sizes, and process its queues in a `QueueHandler`; then hand a `VirtioPciDevice::new(...)`
//! of it to the PCI bus in `vm.rs`.

pub mod blk;
pub mod net;
pub mod rng;
pub mod transport_pci;
pub mod wl;
pub mod worker;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

/// Feature bit: virtio 1.0 or later (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`: the driver says in `used_event` when it wants the next
/// interrupt, the device in `avail_event` when it wants the next notification. A device that
/// offers it must re-arm notifications itself (`Queue::enable_notification`); the transport
/// turns it on for the queues when the driver accepts it.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready; the device may use its queues.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 0x80;
}
/// Device type IDs.
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
}

/// How a device tells the guest it used buffers or changed its config.
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `index` has new used buffers.
    fn notify_queue(&self, index: usize);
    /// The device configuration changed.
    fn notify_config(&self);
}

/// One queue the guest set up, as handed to the device at activation.
pub struct ActiveQueue {
    /// Queue index.
    pub index: usize,
    /// The queue (addresses, size, ring positions).
    pub queue: Queue,
    /// Becomes readable when the guest notifies this queue (an ioeventfd).
    pub notify: EventFd,
}

/// Everything a device needs to start working.
pub struct Activation {
    /// Guest memory (cheap to clone).
    pub mem: GuestMemoryMmap,
    /// Features the driver accepted.
    pub features: u64,
    /// The queues the driver enabled.
    pub queues: Vec<ActiveQueue>,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// Activation errors.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A required queue was not enabled.
    #[error("queue {0} was not set up by the driver")]
    MissingQueue(usize),
    /// The worker thread could not start.
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    /// The worker of the previous activation has not exited yet (the transport activates
    /// only after a reset finished, so only a broken caller sees this).
    #[error("the device's previous worker has not stopped yet")]
    StillStopping,
}

/// A shared-memory region a device asks for (virtio 1.2 shared memory capability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegionSpec {
    /// The region ID (device-specific meaning).
    pub id: u8,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
}

/// Where the transport placed a shared-memory region in guest physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegion {
    /// The region ID.
    pub id: u8,
    /// Guest physical address of its start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (`device_type::*`).
    fn device_type(&self) -> u32;
    /// A short name for logs.
    fn name(&self) -> &str;
    /// Features offered (must include `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration at `offset`; out of range reads as zeros.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the negotiated features and the enabled queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device (the guest reset it) without waiting: a worker thread is told to stop
    /// and finishes the request in hand on its own. Runs on a vCPU holding the device's lock,
    /// so it must never join a thread or wait for a lock a worker may hold across a wait.
    fn reset(&mut self);
    /// True while a reset is still finishing (a worker has not exited yet); the transport
    /// shows the guest a non-zero status until then, and activates the device again only
    /// after. Never waits.
    fn reset_pending(&mut self) -> bool {
        false
    }
    /// PCI class and subclass the transport reports.
    fn pci_class(&self) -> (u8, u8) {
        (0xff, 0x00)
    }
    /// Shared-memory regions wanted. The PCI transport puts them, in this order, in one
    /// 64-bit prefetchable BAR (BAR 2) with one shared-memory capability each; the device
    /// maps host memory into them itself (`vstate::memory_slots`).
    fn shm_regions(&self) -> Vec<ShmRegionSpec> {
        Vec::new()
    }
    /// Where the regions are now: called once when the transport is built and again if the
    /// guest moves the BAR (the device must move its memory slots). Runs with the bus's and
    /// the device's locks held, so it must not wait for a worker.
    fn set_shm_regions(&mut self, _regions: &[ShmRegion]) {}
}

/// Copies the bytes of `config` at `offset` into `data` (zeros beyond its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
