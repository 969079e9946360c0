//! The e820 memory map handed to the kernel in the zero page.

use linux_loader::loader::bootparam::boot_e820_entry;

use super::layout::{ACPI_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved (firmware area, ACPI tables).
pub const E820_RESERVED: u32 = 2;

/// One e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

impl From<E820Entry> for boot_e820_entry {
    fn from(e: E820Entry) -> Self {
        boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        }
    }
}

/// The map for `mem_size` bytes of RAM laid out as in `vstate::memory::ram_ranges`.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: ACPI_START,
            size: HIMEM_START - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_covers_ram_and_skips_the_gap() {
        let m = memory_map(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].addr + m[2].size, 256 << 20);
        let total: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, (256 << 20) - HIMEM_START + EBDA_START);
        let big = memory_map(5 << 30);
        assert_eq!(big.last().unwrap().addr, 4 << 30);
        assert_eq!(big.last().unwrap().size, 2 << 30);
        assert!(big
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }
}
