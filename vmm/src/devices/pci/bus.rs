//! PCI bus 0: up to 32 functions (function 0 only), configuration mechanism #1 on ports
//! 0xcf8 (address) and 0xcfc..0xcff (data), and the MMIO traps of each device's BARs.

use std::sync::{Arc, Mutex};

use super::config_space::BarMove;
use super::device::{BarMapping, PciDevice};
use super::host_bridge::HostBridge;
use crate::devices::bus::{Bus, BusDevice, BusError};

/// A PCI function shared between the bus and its BAR traps.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

const SLOTS: usize = 32;

/// Errors adding devices.
#[derive(Debug, thiserror::Error)]
pub enum PciBusError {
    /// All 32 slots are taken.
    #[error("PCI bus 0 is full")]
    Full,
    /// A BAR overlaps another MMIO range.
    #[error("cannot map BAR of {name}: {err}")]
    Map {
        /// Device name.
        name: String,
        /// Why.
        err: BusError,
    },
}

/// Routes MMIO accesses of one BAR to its device.
struct BarTrap {
    device: SharedPciDevice,
    index: usize,
}

impl BusDevice for BarTrap {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(self.index, offset, data);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(self.index, offset, data);
    }
}

/// Bus 0.
pub struct PciBus {
    slots: Vec<Option<SharedPciDevice>>,
    mmio: Arc<Bus>,
}

fn lock(d: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciBus {
    /// A bus with the host bridge in slot 0; BAR traps go on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<SharedPciDevice>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        Self { slots, mmio }
    }

    /// Adds `device` in the first free slot and traps its trapped BARs. Returns the slot.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciBusError> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or(PciBusError::Full)?;
        let (name, bars) = {
            let d = lock(&device);
            (d.name().to_string(), d.bars())
        };
        for (bar, mapping) in bars {
            if mapping == BarMapping::Trapped {
                let trap = Arc::new(Mutex::new(BarTrap {
                    device: device.clone(),
                    index: bar.index,
                }));
                self.mmio
                    .insert(trap, bar.addr, bar.size)
                    .map_err(|err| PciBusError::Map {
                        name: name.clone(),
                        err,
                    })?;
            }
        }
        log::info!("bulkhead-vmm: PCI 00:{slot:02x}.0 is {name}");
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(device);
        }
        Ok(slot as u8)
    }

    /// The names of the devices on the bus, by slot.
    pub fn device_names(&self) -> Vec<String> {
        self.slots
            .iter()
            .flatten()
            .map(|d| lock(d).name().to_string())
            .collect()
    }

    fn device(&self, slot: usize) -> Option<&SharedPciDevice> {
        self.slots.get(slot).and_then(|s| s.as_ref())
    }

    /// Config read of register `reg` of `slot` (function 0); absent functions read all ones.
    pub fn config_read(&self, slot: usize, function: usize, reg: usize) -> u32 {
        match (function, self.device(slot)) {
            (0, Some(d)) => lock(d).config_read(reg),
            _ => 0xffff_ffff,
        }
    }

    /// Config write; applies a BAR move to the MMIO traps.
    pub fn config_write(
        &self,
        slot: usize,
        function: usize,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        let Some(d) = self.device(slot).filter(|_| function == 0) else {
            return;
        };
        let mv = lock(d).config_write(reg, offset, data);
        if let Some(mv) = mv {
            self.move_bar(d, &mv);
        }
    }

    fn move_bar(&self, d: &SharedPciDevice, mv: &BarMove) {
        let mapping = lock(d)
            .bars()
            .into_iter()
            .find(|(b, _)| b.index == mv.index)
            .map(|(_, m)| m);
        log::info!(
            "bulkhead-vmm: guest moved BAR {} from {:#x} to {:#x}",
            mv.index,
            mv.old,
            mv.new
        );
        if mapping == Some(BarMapping::Trapped) {
            if let Ok(trap) = self.mmio.remove(mv.old) {
                if let Err(e) = self.mmio.insert(trap, mv.new, mv.size) {
                    log::warn!("bulkhead-vmm: BAR at {:#x} not mapped: {e}", mv.new);
                }
            }
        }
        if let Err(e) = lock(d).bar_moved(mv) {
            log::warn!("bulkhead-vmm: BAR move: {e}");
        }
    }
}

/// Ports 0xcf8..0xcff: the address register and the data window.
pub struct PciConfigIo {
    address: u32,
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigIo {
    /// The config mechanism for `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Self { address: 0, bus }
    }

    /// (enabled, bus, slot, function, register) from the address register.
    fn decode(&self) -> Option<(usize, usize, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            ((a >> 11) & 0x1f) as usize,
            ((a >> 8) & 0x7) as usize,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        let value = match self.decode() {
            Some((slot, func, reg)) => self
                .bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(slot, func, reg),
            None => 0xffff_ffff,
        };
        let shift = (offset - 4) as usize;
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 4 {
            let mut bytes = self.address.to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(d) = bytes.get_mut(offset as usize + i) {
                    *d = *b;
                }
            }
            self.address = u32::from_le_bytes(bytes);
            return;
        }
        if let Some((slot, func, reg)) = self.decode() {
            self.bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(slot, func, reg, (offset - 4) as usize, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(
            0xcf8,
            0,
            &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        io.read(0xcf8, 4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_ones() {
        let bus = Arc::new(Mutex::new(PciBus::new(Arc::new(Bus::new()))));
        let mut io = PciConfigIo::new(bus);
        assert_eq!(cfg_read(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read(&mut io, 0, 2) >> 16, 0x0600);
        assert_eq!(cfg_read(&mut io, 5, 0), 0xffff_ffff);
        // The address register reads back (Linux's type-1 probe).
        let mut a = [0u8; 4];
        io.read(0xcf8, 0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000 | (5 << 11));
        // Disabled address: all ones.
        io.write(0xcf8, 0, &0u32.to_le_bytes());
        let mut d = [0u8; 2];
        io.read(0xcf8, 6, &mut d);
        assert_eq!(d, [0xff, 0xff]);
    }
}
