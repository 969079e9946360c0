//! The MSI capability of a passed-through function.
//!
//! vfio-pci already virtualizes the capability's registers: what the guest writes to the
//! address and data registers is kept by the host kernel, not written to the device. So guest
//! writes go through to VFIO's config region unchanged, and after each write that touches the
//! capability this module re-reads it and follows the guest: enabling MSI gives the device an
//! eventfd (`VFIO_DEVICE_SET_IRQS`), bound with an irqfd to a GSI whose KVM route is the
//! guest's (address, data) message. Only the first vector is used (multiple-message enable is
//! not granted); per-vector masking is not emulated.

use std::sync::Arc;

use bulkhead_vfio::device::{CONFIG_REGION, MSI_IRQ};
use bulkhead_vfio::Device;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::irq_routing::IrqRouting;

/// PCI capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;

/// MSI state of one function.
pub struct Msi {
    cap: usize,
    is_64bit: bool,
    len: usize,
    eventfd: EventFd,
    gsi: Option<u32>,
    irqfd_registered: bool,
    enabled: bool,
    routing: Arc<IrqRouting>,
}

impl Msi {
    /// The capability at byte `cap` whose message-control word is `control`.
    pub fn new(cap: usize, control: u16, routing: Arc<IrqRouting>) -> std::io::Result<Self> {
        let is_64bit = control & CONTROL_64BIT != 0;
        let mut len = if is_64bit { 14 } else { 10 };
        if control & CONTROL_PER_VECTOR_MASK != 0 {
            len += 10;
        }
        Ok(Self {
            cap,
            is_64bit,
            len,
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            gsi: None,
            irqfd_registered: false,
            enabled: false,
            routing,
        })
    }

    /// Whether a config write of `len` bytes at byte `at` touches the capability.
    pub fn covers(&self, at: usize, len: usize) -> bool {
        at < self.cap + self.len && at + len > self.cap
    }

    /// Whether the guest has MSI enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn read(device: &Device, at: usize, buf: &mut [u8]) -> Result<(), String> {
        device
            .read_region(CONFIG_REGION, at as u64, buf)
            .map_err(|e| e.to_string())
    }

    /// Follows the guest's view of the capability after it wrote to it.
    pub fn update(&mut self, device: &Device) -> Result<(), String> {
        let mut w = [0u8; 2];
        Self::read(device, self.cap + 2, &mut w)?;
        let enable = u16::from_le_bytes(w) & CONTROL_ENABLE != 0;
        if !enable {
            if self.enabled {
                self.enabled = false;
                device.disable_irq(MSI_IRQ).map_err(|e| e.to_string())?;
                if let Some(gsi) = self.gsi {
                    self.routing.clear_msi(gsi).map_err(|e| e.to_string())?;
                }
                log::info!("bulkhead-vmm: vfio {}: MSI disabled", device.bdf());
            }
            return Ok(());
        }
        let mut d = [0u8; 4];
        Self::read(device, self.cap + 4, &mut d)?;
        let mut address = u64::from(u32::from_le_bytes(d));
        let data_at = if self.is_64bit {
            Self::read(device, self.cap + 8, &mut d)?;
            address |= u64::from(u32::from_le_bytes(d)) << 32;
            self.cap + 12
        } else {
            self.cap + 8
        };
        Self::read(device, data_at, &mut w)?;
        let data = u32::from(u16::from_le_bytes(w));
        let gsi = match self.gsi {
            Some(g) => g,
            None => {
                let g = self.routing.allocate_gsi().map_err(|e| e.to_string())?;
                self.gsi = Some(g);
                g
            }
        };
        self.routing
            .set_msi(gsi, address, data)
            .map_err(|e| e.to_string())?;
        if !self.irqfd_registered {
            self.routing
                .register_irqfd(&self.eventfd, gsi)
                .map_err(|e| e.to_string())?;
            self.irqfd_registered = true;
        }
        if !self.enabled {
            device
                .enable_msi(&[&self.eventfd])
                .map_err(|e| e.to_string())?;
            self.enabled = true;
            log::info!(
                "bulkhead-vmm: vfio {}: MSI enabled (GSI {gsi}, address {address:#x}, data {data:#x})",
                device.bdf()
            );
        }
        Ok(())
    }

    /// Stops interrupts from the device (VM end).
    pub fn disable(&mut self, device: &Device) {
        if self.enabled {
            self.enabled = false;
            if let Err(e) = device.disable_irq(MSI_IRQ) {
                log::warn!("bulkhead-vmm: vfio {}: disabling MSI: {e}", device.bdf());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn capability_extent_follows_its_control_word() {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = std::sync::Arc::new(kvm.create_vm().unwrap());
        let routing = std::sync::Arc::new(super::IrqRouting::new(vm));
        let m = super::Msi::new(0x50, 0, routing.clone()).unwrap();
        assert!(m.covers(0x50, 1) && m.covers(0x58, 2) && !m.covers(0x5a, 4));
        assert!(m.covers(0x4e, 4), "a write straddling the start");
        assert!(!m.enabled());
        let m64 = super::Msi::new(0x50, 1 << 7 | 1 << 8, routing).unwrap();
        assert!(m64.covers(0x50 + 23, 1) && !m64.covers(0x50 + 24, 1));
    }
}
