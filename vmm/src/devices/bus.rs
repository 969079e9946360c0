//! Address buses: the I/O-port bus and the MMIO bus the vCPU exit handler dispatches to.
//!
//! A device is registered over a range `[base, base + len)`; an access is delivered with the
//! range base and the offset inside it. Ranges never overlap. The map sits behind a `RwLock`
//! so PCI BAR moves (rare, config-space writes) can update it while vCPUs read it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` into the range that starts at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the range that starts at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already present, or is empty or wraps.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// No device at that base.
    #[error("no bus range starts at {0:#x}")]
    NotFound(u64),
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` over `[base, base + len)`.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Result<SharedBusDevice, BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    fn lookup(&self, addr: u64, size: usize) -> Option<(u64, SharedBusDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fit in the range.
        if offset.checked_add(size as u64)? > entry.len {
            return None;
        }
        Some((*base, entry.device.clone()))
    }

    /// Dispatches a read. Returns false (and leaves `data` alone) if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(dev.clone(), 0xf8, 9).is_err());
        assert!(bus.insert(dev.clone(), 0, 0).is_err());
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        // Straddling the end of a range is not claimed.
        assert!(!bus.read(0x10f, &mut [0u8; 4]));
        assert!(!bus.read(0x200, &mut b));
        assert!(bus.write(0x102, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x100, 2, vec![7])]);
        bus.remove(0x100).unwrap();
        assert!(!bus.write(0x102, &[7]));
    }
}
