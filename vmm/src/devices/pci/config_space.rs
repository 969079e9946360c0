//! A type-0 PCI configuration space (256 bytes): header, BAR sizing/programming semantics,
//! and the capability list. Writes go through a per-bit writable mask, so read-only fields stay
//! read-only whatever the guest writes.

/// Offset of the first capability.
const FIRST_CAP: usize = 0x40;
const CONFIG_REGS: usize = 64;
const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const CAP_PTR_REG: usize = 0xd;
const INTERRUPT_REG: usize = 0xf;
/// Command register bits: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0000_0407;
/// Status bit: capability list present.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY: u32 = 0x2;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mmio32,
    /// 64-bit memory BAR (uses two BAR registers).
    Mmio64,
}

/// A BAR as the device declared it and where the guest currently has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// BAR index (0..6).
    pub index: usize,
    /// Guest physical address now programmed.
    pub addr: u64,
    /// Size (a power of two, at least 16 bytes... we use at least 4 KiB).
    pub size: u64,
    /// Decoding kind.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A BAR the guest reprogrammed: the bus must move its mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub index: usize,
    /// Old base.
    pub old: u64,
    /// New base.
    pub new: u64,
    /// Size.
    pub size: u64,
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    /// The BAR index or size is invalid or already used.
    #[error("invalid BAR {index} (size {size:#x})")]
    BadBar {
        /// BAR index.
        index: usize,
        /// Size.
        size: u64,
    },
    /// No room for the capability.
    #[error("no room for a {0}-byte capability")]
    NoRoom(usize),
}

/// The identity fields of a type-0 header.
#[derive(Debug, Clone, Copy)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// A device's configuration space.
pub struct PciConfigSpace {
    regs: [u32; CONFIG_REGS],
    wmask: [u32; CONFIG_REGS],
    bars: [Option<PciBar>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfigSpace {
    /// A header with no BARs and no capabilities.
    pub fn new(h: PciHeader) -> Self {
        let mut regs = [0u32; CONFIG_REGS];
        let mut wmask = [0u32; CONFIG_REGS];
        regs[0] = u32::from(h.vendor) | (u32::from(h.device) << 16);
        regs[2] = u32::from(h.revision)
            | (u32::from(h.prog_if) << 8)
            | (u32::from(h.subclass) << 16)
            | (u32::from(h.class) << 24);
        regs[0xb] = u32::from(h.subsystem_vendor) | (u32::from(h.subsystem) << 16);
        wmask[COMMAND_REG] = COMMAND_WRITABLE;
        wmask[INTERRUPT_REG] = 0xff; // interrupt line
        Self {
            regs,
            wmask,
            bars: [None; 6],
            last_cap: None,
            next_cap: FIRST_CAP,
        }
    }

    /// Declares BAR `index` at `addr` (already allocated) of `size` bytes.
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), ConfigSpaceError> {
        let bad = ConfigSpaceError::BadBar {
            index: bar.index,
            size: bar.size,
        };
        let regs_used = if bar.kind == BarKind::Mmio64 { 2 } else { 1 };
        if bar.index + regs_used > 6
            || !bar.size.is_power_of_two()
            || bar.size < 16
            || bar.addr & (bar.size - 1) != 0
            || (bar.kind == BarKind::Mmio32 && bar.addr + bar.size > 1 << 32)
        {
            return Err(bad);
        }
        for i in bar.index..bar.index + regs_used {
            if self.bars.get(i).is_none_or(|b| b.is_some()) || self.wmask[BAR0_REG + i] != 0 {
                return Err(bad);
            }
        }
        let mut flags = 0u32;
        if bar.kind == BarKind::Mmio64 {
            flags |= 0x4;
        }
        if bar.prefetchable {
            flags |= 0x8;
        }
        let r = BAR0_REG + bar.index;
        self.regs[r] = (bar.addr as u32 & !0xf) | flags;
        self.wmask[r] = !((bar.size - 1) as u32) & !0xf;
        if bar.kind == BarKind::Mmio64 {
            self.regs[r + 1] = (bar.addr >> 32) as u32;
            self.wmask[r + 1] = !((bar.size - 1) >> 32) as u32;
        }
        self.bars[bar.index] = Some(bar);
        Ok(())
    }

    /// The BARs declared.
    pub fn bars(&self) -> impl Iterator<Item = &PciBar> {
        self.bars.iter().flatten()
    }

    /// Appends a capability: `id`, a next pointer, then `body`; `writable` (same length as
    /// `body`, or empty for read-only) marks the guest-writable bits. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigSpaceError> {
        let len = 2 + body.len();
        let off = self.next_cap;
        if off + len > CONFIG_REGS * 4 {
            return Err(ConfigSpaceError::NoRoom(len));
        }
        self.set_byte(off, id);
        self.set_byte(off + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + 2 + i, *b);
            if let Some(m) = writable.get(i) {
                self.set_wmask_byte(off + 2 + i, *m);
            }
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.regs[CAP_PTR_REG] = off as u32;
                self.regs[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        if let Some(r) = self.regs.get_mut(off / 4) {
            let shift = (off % 4) * 8;
            *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
        }
    }

    fn set_wmask_byte(&mut self, off: usize, v: u8) {
        if let Some(r) = self.wmask.get_mut(off / 4) {
            let shift = (off % 4) * 8;
            *r = (*r & !(0xff << shift)) | (u32::from(v) << shift);
        }
    }

    /// Reads 32-bit register `reg` (0..64); out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Reads `len` bytes at byte offset `off` as a little-endian value.
    pub fn read_bytes(&self, off: usize, len: usize) -> u32 {
        let mut v = 0u32;
        for i in 0..len.min(4) {
            let r = self.read_reg((off + i) / 4);
            let b = (r >> (((off + i) % 4) * 8)) & 0xff;
            v |= b << (i * 8);
        }
        v
    }

    /// Writes `data` at byte `offset` within register `reg`, through the writable mask.
    /// Returns a BAR move when the guest reprogrammed a BAR address.
    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        let (Some(old), Some(mask)) = (self.regs.get(reg).copied(), self.wmask.get(reg).copied())
        else {
            return None;
        };
        let mut new = old;
        for (i, b) in data.iter().enumerate() {
            let pos = offset + i;
            if pos >= 4 {
                break;
            }
            let shift = pos * 8;
            let m = (mask >> shift) & 0xff;
            let byte = (u32::from(*b) & m) | ((old >> shift) & 0xff & !m);
            new = (new & !(0xff << shift)) | (byte << shift);
        }
        self.regs[reg] = new;
        if (BAR0_REG..BAR0_REG + 6).contains(&reg) {
            let all_ones = data.len() == 4 && data.iter().all(|b| *b == 0xff);
            if !all_ones {
                return self.bar_moved(reg - BAR0_REG);
            }
        }
        None
    }

    fn bar_moved(&mut self, reg_index: usize) -> Option<BarMove> {
        // The BAR that owns this register (the low half, or the high half of a 64-bit BAR).
        let index = if self.bars.get(reg_index).copied().flatten().is_some() {
            reg_index
        } else {
            let lo = reg_index.checked_sub(1)?;
            match self.bars.get(lo).copied().flatten() {
                Some(b) if b.kind == BarKind::Mmio64 => lo,
                _ => return None,
            }
        };
        let bar = self.bars.get_mut(index)?.as_mut()?;
        let r = BAR0_REG + index;
        let mut addr = u64::from(self.regs[r] & !0xf);
        if bar.kind == BarKind::Mmio64 {
            addr |= u64::from(self.regs[r + 1]) << 32;
        }
        if addr == bar.addr {
            return None;
        }
        let mv = BarMove {
            index,
            old: bar.addr,
            new: addr,
            size: bar.size,
        };
        bar.addr = addr;
        Some(mv)
    }

    /// The command register's memory-decode bit.
    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & COMMAND_MEMORY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn ids_and_read_only_fields() {
        let mut c = PciConfigSpace::new(header());
        assert_eq!(c.read_reg(0), 0x1044_1af4);
        c.write(0, 0, &[0, 0, 0, 0]);
        assert_eq!(c.read_reg(0), 0x1044_1af4, "IDs are read-only");
        c.write(1, 0, &[0xff, 0xff]);
        assert_eq!(c.read_reg(1) & 0xffff, 0x0407);
        assert_eq!(c.read_reg(2) >> 24, 0xff);
        assert_eq!(c.read_reg(64), 0xffff_ffff);
    }

    #[test]
    fn bar_sizing_and_moving() {
        let mut c = PciConfigSpace::new(header());
        c.add_bar(PciBar {
            index: 0,
            addr: 0xc000_0000,
            size: 0x8000,
            kind: BarKind::Mmio32,
            prefetchable: false,
        })
        .unwrap();
        assert_eq!(c.read_reg(4), 0xc000_0000);
        assert_eq!(c.write(4, 0, &[0xff; 4]), None);
        assert_eq!(c.read_reg(4), 0xffff_8000, "size mask");
        // Restoring the original address is no move.
        assert_eq!(c.write(4, 0, &0xc000_0000u32.to_le_bytes()), None);
        let mv = c.write(4, 0, &0xd000_0000u32.to_le_bytes()).unwrap();
        assert_eq!(
            (mv.old, mv.new, mv.size),
            (0xc000_0000, 0xd000_0000, 0x8000)
        );
        // Unused BARs read 0 and cannot be sized.
        c.write(5, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(5), 0);
    }

    #[test]
    fn bar_64_bit_uses_two_registers() {
        let mut c = PciConfigSpace::new(header());
        c.add_bar(PciBar {
            index: 2,
            addr: 0x1_0000_0000,
            size: 0x10_0000,
            kind: BarKind::Mmio64,
            prefetchable: true,
        })
        .unwrap();
        assert_eq!(c.read_reg(6), 0xc);
        assert_eq!(c.read_reg(7), 1);
        let mv = c.write(7, 0, &2u32.to_le_bytes()).unwrap();
        assert_eq!(mv.new, 0x2_0000_0000);
        assert!(c
            .add_bar(PciBar {
                index: 3,
                addr: 0xc000_0000,
                size: 0x1000,
                kind: BarKind::Mmio32,
                prefetchable: false
            })
            .is_err());
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = PciConfigSpace::new(header());
        let a = c.add_capability(0x09, &[1, 2, 3], &[]).unwrap();
        let b = c.add_capability(0x11, &[0, 0], &[0, 0xc0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(c.read_reg(0xd) & 0xff, 0x40);
        assert_ne!(c.read_reg(1) & (1 << 20), 0);
        assert_eq!(c.read_bytes(a + 1, 1) as usize, b);
        assert_eq!(c.read_bytes(b, 1), 0x11);
        c.write(b / 4, (b % 4) + 3, &[0xff]);
        assert_eq!(c.read_bytes(b + 3, 1), 0xc0);
        c.write(a / 4, (a % 4) + 2, &[0xff]);
        assert_eq!(c.read_bytes(a + 2, 1), 1, "read-only capability body");
    }
}
