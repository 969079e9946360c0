//! The MSI capability of a passed-through function.
//!
//! vfio-pci virtualizes the capability's registers: what the guest writes to the address and
//! data registers is kept by the host kernel, not written to the device. So guest writes go
//! through to VFIO's config region unchanged, and this module re-reads address and data from
//! there. The enable bit is different: vfio-pci clears it in what it keeps unless MSI is already
//! on through `VFIO_DEVICE_SET_IRQS` ("MSI is enabled via ioctl"), so the VMM keeps the guest's
//! enable bit itself (and shows it in reads). Enabling MSI gives the device an eventfd, bound
//! with an irqfd to a GSI whose KVM route is the guest's (address, data) message. Only the
//! first vector is used (multiple-message enable is not granted); per-vector masking is not
//! emulated.

use std::sync::Arc;

use bulkhead_vfio::device::{CONFIG_REGION, MSI_IRQ};
use bulkhead_vfio::Device;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::irq_routing::IrqRouting;

/// PCI capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1;
/// Multiple Message Capable (bits 1-3) and Multiple Message Enable (bits 4-6): the VMM
/// routes one vector, so the guest sees a single-message capability.
const CONTROL_MULTI_MESSAGE: u16 = 0x7e;
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
    /// The guest's enable bit, as last written.
    guest_enable: bool,
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
            guest_enable: false,
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

    /// Records the guest's enable bit if a config write of `data` at byte `at` covers it (bit 0
    /// of message control, at byte `cap + 2`); returns the new value then.
    pub fn config_write(&mut self, at: usize, data: &[u8]) -> Option<bool> {
        let lo = self.cap + 2;
        if at > lo || at + data.len() <= lo {
            return None;
        }
        let byte = data.get(lo - at)?;
        self.guest_enable = u16::from(*byte) & CONTROL_ENABLE != 0;
        Some(self.guest_enable)
    }

    /// The config dword `reg` as read from the device, with the guest's enable bit in it and
    /// one message only (capable and enabled).
    pub fn patch_config_read(&self, reg: usize, value: u32) -> u32 {
        if reg * 4 == self.cap {
            (value & !(u32::from(CONTROL_ENABLE | CONTROL_MULTI_MESSAGE) << 16))
                | (u32::from(self.guest_enable) << 16)
        } else {
            value
        }
    }

    /// Follows the guest's view of the capability after it wrote to it.
    pub fn update(&mut self, device: &Device) -> Result<(), String> {
        let mut w = [0u8; 2];
        if !self.guest_enable {
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
        let mut m = super::Msi::new(0x50, 0, routing.clone()).unwrap();
        assert!(m.covers(0x50, 1) && m.covers(0x58, 2) && !m.covers(0x5a, 4));
        // The enable bit is the guest's, whatever vfio-pci reports.
        assert_eq!(m.config_write(0x54, &[1, 0]), None);
        assert_eq!(m.config_write(0x50, &[5, 0x60, 1, 0]), Some(true));
        assert_eq!(m.patch_config_read(0x14, 0x0080_6005), 0x0081_6005);
        assert_eq!(m.config_write(0x52, &[0x80, 0]), Some(false));
        assert_eq!(m.patch_config_read(0x14, 0x0081_6005), 0x0080_6005);
        assert_eq!(m.patch_config_read(0x15, 0x1), 0x1);
        // A device capable of 8 messages (MMC = 3) with 4 enabled (MME = 2) reads as one.
        assert_eq!(m.patch_config_read(0x14, 0x0026_6005), 0x0000_6005);
        assert!(m.covers(0x4e, 4), "a write straddling the start");
        assert!(!m.enabled());
        let m64 = super::Msi::new(0x50, 1 << 7 | 1 << 8, routing).unwrap();
        assert!(m64.covers(0x50 + 23, 1) && !m64.covers(0x50 + 24, 1));
    }
}
