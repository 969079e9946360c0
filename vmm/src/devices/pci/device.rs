//! The interface every PCI function implements (virtio-pci transport, VFIO passthrough, the
//! host bridge). The bus owns config-space routing and the MMIO mapping of trapped BARs; a
//! device owns its config space, its BARs (allocated from the `BarAllocator` when it is built)
//! and whatever must follow a BAR move (ioeventfds, KVM memory slots).

use super::config_space::{BarMove, PciBar};

/// How the bus should map a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarMapping {
    /// Accesses exit to the VMM and reach `PciDevice::bar_read`/`bar_write`.
    Trapped,
    /// The device maps it itself (a KVM memory slot); the bus does not trap it.
    DeviceMapped,
}

/// One PCI function on bus 0.
pub trait PciDevice: Send {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// Reads 32-bit config register `reg` (0..64, or up to 1024 for extended space).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` (0..4) of register `reg`; returns a BAR move if the guest
    /// reprogrammed a BAR.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove>;
    /// The BARs with how each is mapped.
    fn bars(&self) -> Vec<(PciBar, BarMapping)>;
    /// A read of a trapped BAR.
    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]);
    /// A write to a trapped BAR.
    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]);
    /// Called after the bus moved a BAR's trap (or before, for device-mapped BARs): the device
    /// re-registers whatever depends on the address (ioeventfds, memory slots).
    fn bar_moved(&mut self, mv: &BarMove) -> Result<(), String>;
}
