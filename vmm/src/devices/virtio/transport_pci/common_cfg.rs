//! The common configuration structure (BAR 0 + 0x0000): feature negotiation, queue setup,
//! the device status and its state changes (activation, reset).

use std::sync::atomic::Ordering;

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::super::{
    status, Activation, ActiveQueue, VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use super::{Common, PciInterrupt, VirtioPciDevice, VIRTIO_MSI_NO_VECTOR};

impl VirtioPciDevice {
    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.common.queue_select))
    }

    pub(super) fn read_common(&mut self, offset: u64, len: usize) -> u32 {
        let status = self.status();
        let c = &self.common;
        let feature_word = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let qsel = usize::from(c.queue_select);
        let q = self.queues.get(qsel);
        let value: u64 = match offset {
            0x00 => u64::from(c.device_feature_select),
            0x04 => u64::from(feature_word(
                self.device.features(),
                c.device_feature_select,
            )),
            0x08 => u64::from(c.driver_feature_select),
            0x0c => u64::from(feature_word(c.driver_features, c.driver_feature_select)),
            0x10 => u64::from(c.msix_config),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(status),
            0x15 => u64::from(c.config_generation),
            0x16 => u64::from(c.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1a => self
                .queue_vectors
                .get(qsel)
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |v| u64::from(*v)),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => qsel as u64,
            0x20 => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        let mask = if len >= 4 {
            u32::MAX
        } else {
            (1u32 << (len * 8)) - 1
        };
        (value as u32) & mask
    }

    pub(super) fn write_common(&mut self, offset: u64, value: u32) {
        let live = self.activated;
        // The features are settled once FEATURES_OK is set (virtio 1.x §3.1.1).
        let settled = live || self.common.status & status::FEATURES_OK != 0;
        match offset {
            0x00 => self.common.device_feature_select = value,
            0x08 => self.common.driver_feature_select = value,
            0x0c if !settled => match self.common.driver_feature_select {
                0 => {
                    self.common.driver_features =
                        (self.common.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.common.driver_features =
                        (self.common.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x10 => self.common.msix_config = self.checked_vector(value as u16),
            0x14 => self.write_status(value as u8),
            0x16 => self.common.queue_select = value as u16,
            0x18 if !live => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            0x1a => {
                let qsel = usize::from(self.common.queue_select);
                let vector = self.checked_vector(value as u16);
                if let Some(v) = self.queue_vectors.get_mut(qsel) {
                    *v = vector;
                }
            }
            0x1c if !live => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x20..=0x34 if !live => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let (lo, hi) = if offset % 8 == 0 {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match offset {
                    0x20 | 0x24 => q.set_desc_table_address(lo, hi),
                    0x28 | 0x2c => q.set_avail_ring_address(lo, hi),
                    0x30 | 0x34 => q.set_used_ring_address(lo, hi),
                    _ => {}
                }
            }
            _ => log::debug!(
                "bulkhead-vmm: {}: common config write {offset:#x} ignored",
                self.name
            ),
        }
    }

    fn write_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        if !self.reset_finished() {
            // The driver must wait for status 0 first; a write before that is ignored (the
            // device's previous worker may still be finishing its last request).
            log::debug!(
                "bulkhead-vmm: {}: status {new:#x} written while a reset is finishing; ignored",
                self.name
            );
            return;
        }
        let old = self.common.status;
        let mut new = new | old; // bits are only ever added, except by a reset
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let acked = self.common.driver_features;
            if acked & !offered != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                log::warn!(
                    "bulkhead-vmm: {}: driver features {acked:#x} refused (offered {offered:#x})",
                    self.name
                );
                new &= !status::FEATURES_OK;
            }
        }
        self.common.status = new;
        if new & status::DRIVER_OK != 0
            && new & status::FEATURES_OK != 0
            && new & status::FAILED == 0
            && !self.activated
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                log::warn!(
                    "bulkhead-vmm: {}: queue {i} is invalid, not started",
                    self.name
                );
                continue;
            }
            let notify = match self.notify.get(i).map(|e| e.try_clone()) {
                Some(Ok(e)) => e,
                _ => continue,
            };
            let Ok(mut queue) = Queue::try_from(q.state()) else {
                continue;
            };
            queue.set_event_idx(self.common.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
            queues.push(ActiveQueue {
                index: i,
                queue,
                notify,
            });
        }
        if !self.msix.enabled() {
            log::warn!(
                "bulkhead-vmm: {}: MSI-X is off; the device cannot interrupt",
                self.name
            );
        }
        let interrupt = Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            queue_vectors: self.queue_vectors.clone(),
            config_vector: self.common.msix_config,
        });
        let act = Activation {
            mem: self.mem.clone(),
            features: self.common.driver_features,
            queues,
            interrupt: interrupt.clone(),
        };
        match self.device.activate(act) {
            Ok(()) => {
                self.activated = true;
                log::info!("bulkhead-vmm: {} activated", self.name);
            }
            Err(e) => {
                log::error!("bulkhead-vmm: {}: activation failed: {e}", self.name);
                self.common.status |= status::DEVICE_NEEDS_RESET;
                interrupt.notify_config();
            }
        }
    }

    /// The guest wrote status 0. The device is told to stop without waiting for it (this
    /// runs on a vCPU holding the device's lock); until it has, the guest reads the old
    /// status and writes of other values are ignored.
    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
            self.resetting = Some(self.common.status.max(1));
        }
        for q in self.queues.iter_mut() {
            q.reset();
        }
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.common = Common {
            msix_config: VIRTIO_MSI_NO_VECTOR,
            config_generation: self.common.config_generation,
            ..Default::default()
        };
        self.isr.store(0, Ordering::SeqCst);
    }
}
