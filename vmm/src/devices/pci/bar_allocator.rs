//! BAR address allocation in the 32-bit PCI MMIO window (vm-allocator).

use vm_allocator::{AddressAllocator, AllocPolicy};

/// Errors allocating BAR space.
#[derive(Debug, thiserror::Error)]
pub enum BarAllocError {
    /// The window is full or the request is invalid.
    #[error("cannot allocate a {size:#x}-byte BAR: {err}")]
    Exhausted {
        /// Requested size.
        size: u64,
        /// vm-allocator's reason.
        err: vm_allocator::Error,
    },
}

/// Hands out naturally aligned BAR ranges from one window.
pub struct BarAllocator {
    mmio32: AddressAllocator,
}

impl BarAllocator {
    /// An allocator over `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Result<Self, BarAllocError> {
        let mmio32 = AddressAllocator::new(base, size)
            .map_err(|err| BarAllocError::Exhausted { size, err })?;
        Ok(Self { mmio32 })
    }

    /// A `size`-byte range aligned to `size` (a power of two).
    pub fn allocate_mmio32(&mut self, size: u64) -> Result<u64, BarAllocError> {
        self.mmio32
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|err| BarAllocError::Exhausted { size, err })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut a = BarAllocator::new(0xc000_0000, 0x10_0000).unwrap();
        let x = a.allocate_mmio32(0x1000).unwrap();
        let y = a.allocate_mmio32(0x8000).unwrap();
        assert_eq!(y % 0x8000, 0);
        assert!(x + 0x1000 <= y || y + 0x8000 <= x);
        assert!(a.allocate_mmio32(0x20_0000).is_err());
    }
}
