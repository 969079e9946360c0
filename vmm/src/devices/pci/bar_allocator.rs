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

/// Hands out naturally aligned BAR ranges from a 32-bit and a 64-bit window.
pub struct BarAllocator {
    mmio32: AddressAllocator,
    mmio64: Option<AddressAllocator>,
}

impl BarAllocator {
    /// An allocator over the 32-bit window `[base, base + size)` only.
    pub fn new(base: u64, size: u64) -> Result<Self, BarAllocError> {
        let mmio32 = AddressAllocator::new(base, size)
            .map_err(|err| BarAllocError::Exhausted { size, err })?;
        Ok(Self {
            mmio32,
            mmio64: None,
        })
    }

    /// Adds the 64-bit window `[base, base + size)`.
    pub fn with_mmio64(mut self, base: u64, size: u64) -> Result<Self, BarAllocError> {
        self.mmio64 = Some(
            AddressAllocator::new(base, size)
                .map_err(|err| BarAllocError::Exhausted { size, err })?,
        );
        Ok(self)
    }

    /// A `size`-byte range aligned to `size` in the 64-bit window.
    pub fn allocate_mmio64(&mut self, size: u64) -> Result<u64, BarAllocError> {
        match self.mmio64.as_mut() {
            Some(a) => a
                .allocate(size, size, AllocPolicy::FirstMatch)
                .map(|r| r.start())
                .map_err(|err| BarAllocError::Exhausted { size, err }),
            None => Err(BarAllocError::Exhausted {
                size,
                err: vm_allocator::Error::Overflow,
            }),
        }
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
        assert!(a.allocate_mmio64(0x1000).is_err(), "no 64-bit window yet");
        let mut a = a.with_mmio64(64 << 30, 64 << 30).unwrap();
        let z = a.allocate_mmio64(4 << 30).unwrap();
        assert_eq!(z % (4 << 30), 0);
        assert!(z >= 64 << 30);
    }
}
