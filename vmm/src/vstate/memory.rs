//! Guest RAM: allocation around the 32-bit MMIO gap and registration with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::boot::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used everywhere in the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is too small to boot anything.
    #[error("guest memory of {0} bytes is too small (at least 16 MiB)")]
    TooSmall(u64),
    /// The requested size would reach the 64-bit PCI window.
    #[error("guest memory of {0} bytes is too large (at most 63 GiB)")]
    TooLarge(u64),
    /// mmap of the guest RAM failed.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(vm_memory::mmap::FromRangesError),
    /// A region has no host address.
    #[error("guest memory region has no host mapping")]
    HostAddress,
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    SetRegion(kvm_ioctls::Error),
}

/// The RAM ranges for `size` bytes of guest memory: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize));
    }
    ranges
}

/// Allocates anonymous guest RAM of `size` bytes laid out around the MMIO gap.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < (16 << 20) {
        return Err(MemoryError::TooSmall(size));
    }
    if size > crate::boot::layout::PCI_MMIO64_START - (MMIO_GAP_END - MMIO_GAP_START) {
        return Err(MemoryError::TooLarge(size));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(MemoryError::Allocate)
}

/// Asks the host kernel for transparent huge pages on guest RAM (fewer TLB and nested-paging
/// misses; matters most when the host itself is a VM). Advisory: failures are ignored.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: the range is exactly one mmap'd guest region owned by `mem`; MADV_HUGEPAGE
        // changes only the kernel's paging policy for it, never its contents.
        let r = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if r != 0 {
            log::debug!(
                "bulkhead-vmm: MADV_HUGEPAGE refused: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Registers every region of `mem` as a KVM memory slot, slots 0.. in order.
/// Returns the next free slot number.
pub fn register_guest_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<u32, MemoryError> {
    let mut slot = 0u32;
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress)?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`'s mmap, which lives as long as the VM (the Vm
        // owns both and drops the VM fd first), and the slot numbers are unique.
        unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::SetRegion)?;
        slot += 1;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_is_split_around_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), 3 << 30));
        assert_eq!(r[1], (GuestAddress(4 << 30), 1 << 30));
    }

    #[test]
    fn tiny_memory_is_refused() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
    }
}
