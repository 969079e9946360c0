//! The host bridge at 00:00.0. Linux's type-1 config probe wants a host-bridge-class function
//! on bus 0 before it trusts ports 0xcf8/0xcfc.

use super::config_space::{BarMove, PciBar, PciConfigSpace, PciHeader};
use super::device::{BarMapping, PciDevice};

/// A host bridge with no BARs.
pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    /// Red Hat's generic host bridge IDs (1b36:0008), class 06.00.
    pub fn new() -> Self {
        Self {
            config: PciConfigSpace::new(PciHeader {
                vendor: 0x1b36,
                device: 0x0008,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor: 0,
                subsystem: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        self.config.write(reg, offset, data)
    }
    fn bars(&self) -> Vec<(PciBar, BarMapping)> {
        Vec::new()
    }
    fn bar_read(&mut self, _index: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _index: usize, _offset: u64, _data: &[u8]) {}
    fn bar_moved(&mut self, _mv: &BarMove) -> Result<(), String> {
        Ok(())
    }
}
