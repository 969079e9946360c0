//! Guest RAM: allocation around the 32-bit MMIO gap and registration with KVM.
//!
//! Each RAM range is mapped at a host address that is a multiple of 2 MiB. KVM maps guest
//! memory with 2 MiB pages only where the guest and host addresses agree modulo 2 MiB (it
//! checks that once per slot, at `KVM_SET_USER_MEMORY_REGION`), and the host kernel (6.1)
//! places a plain anonymous mmap at any 4 KiB boundary. Unaligned, every 4 KiB page the guest
//! touches costs a nested-paging fault, even where the host backs it with a huge page.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::boot::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used everywhere in the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<RamMapping>;

/// The size of a huge page (x86-64 PMD).
pub const HUGE_PAGE: usize = 2 << 20;

/// The host mapping of one RAM range, which this VMM made itself (at a 2 MiB boundary) and
/// unmaps when the last `GuestMemoryMmap` clone that holds it is gone.
///
/// vm-memory's `MmapRegion` unmaps only mappings it made itself (always at an address the
/// kernel chose), and keeps one value of its bitmap type per region for exactly the region's
/// life. So the owner of our own mapping rides in that slot: it tracks no dirty pages (as
/// `()` does) and its `Drop` unmaps the range.
#[derive(Debug, Default)]
pub struct RamMapping {
    /// Dropped (unmapped) with the region; `None` for a mapping vm-memory owns itself.
    _owned: Option<OwnedMmap>,
}

#[derive(Debug)]
struct OwnedMmap {
    addr: usize,
    len: usize,
}

impl Drop for OwnedMmap {
    fn drop(&mut self) {
        // SAFETY: [addr, addr + len) is a mapping this process made in `map_aligned` (the guard
        // page and the RAM) that only the `MmapRegion` now being dropped used; nothing refers
        // to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// For memory vm-memory maps itself (`GuestMemoryMmap::from_ranges`, in tests and fuzz
/// targets): nothing of ours to unmap.
impl NewBitmap for RamMapping {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl WithBitmapSlice<'_> for RamMapping {
    type S = ();
}

impl Bitmap for RamMapping {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

/// A page of the host.
const PAGE: usize = 4096;

/// Maps `len` bytes of private anonymous memory (no swap reservation) at a host address that
/// is a multiple of [`HUGE_PAGE`], with one inaccessible page right below it: maps
/// `len + HUGE_PAGE + PAGE` and gives back the rest. Returns (guard page, RAM) addresses.
///
/// The guard page keeps the host from placing the next mapping (a thread's 2 MiB stack, say)
/// so that it ends exactly at the RAM's 2 MiB boundary: such a stack would be 2 MiB-aligned
/// and, with transparent huge pages on, take a whole huge page at its first touch (seen: the
/// VMM's memory beyond guest RAM went from 2.3 to 4.3 MiB).
fn map_aligned(len: usize) -> std::io::Result<(usize, usize)> {
    let total = len
        .checked_add(HUGE_PAGE + PAGE)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel chooses; it touches no
    // existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = (start + PAGE + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let guard = aligned - PAGE;
    let head = guard - start;
    let tail = start + total - (aligned + len);
    // SAFETY: every range lies inside the mapping just made, which nothing else uses; what
    // is kept is [guard, aligned + len).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::mprotect(guard as *mut libc::c_void, PAGE, libc::PROT_NONE);
    }
    Ok((guard, aligned))
}

/// One RAM range at `guest`, `len` bytes, mapped at a 2 MiB-aligned host address.
fn aligned_region(
    guest: GuestAddress,
    len: usize,
) -> Result<vm_memory::GuestRegionMmap<RamMapping>, MemoryError> {
    let (guard, addr) = map_aligned(len).map_err(MemoryError::Map)?;
    let owner = RamMapping {
        _owned: Some(OwnedMmap {
            addr: guard,
            len: len + PAGE,
        }),
    };
    // SAFETY: [addr, addr + len) is the readable and writable mapping just made; the region
    // keeps its owner, which unmaps it only when the region itself is dropped.
    let builder = unsafe {
        MmapRegionBuilder::new_with_bitmap(len, owner)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .with_raw_mmap_pointer(addr as *mut u8)
    };
    let region = builder.build().map_err(MemoryError::Region)?;
    vm_memory::GuestRegionMmap::new(region, guest).ok_or(MemoryError::HostAddress)
}

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
    Map(std::io::Error),
    /// vm-memory refused the mapping.
    #[error("cannot use the guest memory mapping: {0}")]
    Region(vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the regions.
    #[error("cannot lay out guest memory: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
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

/// Allocates anonymous guest RAM of `size` bytes laid out around the MMIO gap, each range at
/// a 2 MiB-aligned host address.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < (16 << 20) {
        return Err(MemoryError::TooSmall(size));
    }
    if size > crate::boot::layout::PCI_MMIO64_START - (MMIO_GAP_END - MMIO_GAP_START) {
        return Err(MemoryError::TooLarge(size));
    }
    let regions = ram_ranges(size)
        .into_iter()
        .map(|(guest, len)| aligned_region(guest, len))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)
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
    fn ram_is_mapped_at_2mib_boundaries_and_usable() {
        use vm_memory::Bytes;
        let size = (3u64 << 30) + (64 << 20); // both sides of the MMIO gap
        let mem = create_guest_memory(size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for region in mem.iter() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "region at {:?}", region.start_addr());
            // An inaccessible page right below: nothing else can end at the boundary.
            let guard = format!("{:x}-{host:x} ---p", host - PAGE);
            assert!(
                maps.lines().any(|l| l.starts_with(&guard)),
                "{guard} in\n{maps}"
            );
        }
        let top = GuestAddress(MMIO_GAP_END + (64 << 20) - 8);
        mem.write_obj(0x1234_5678_u64, top).unwrap();
        assert_eq!(mem.read_obj::<u64>(top).unwrap(), 0x1234_5678);
        mem.write_obj(7u8, GuestAddress(0)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
    }

    /// The mapping is unmapped when the last clone of the memory goes (and not before).
    #[test]
    fn ram_is_unmapped_with_the_last_clone() {
        let mapped = |addr: usize| {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .any(|l| l.starts_with(&format!("{addr:x}-")))
        };
        let mem = create_guest_memory(32 << 20).unwrap();
        let host = mem
            .iter()
            .next()
            .unwrap()
            .get_host_address(MemoryRegionAddress(0))
            .unwrap() as usize;
        assert!(mapped(host));
        let clone = mem.clone();
        drop(mem);
        assert!(mapped(host));
        assert!(mapped(host - PAGE));
        drop(clone);
        assert!(!mapped(host));
        assert!(!mapped(host - PAGE));
    }

    #[test]
    fn tiny_memory_is_refused() {
        assert!(matches!(
            create_guest_memory(1 << 20),
            Err(MemoryError::TooSmall(_))
        ));
    }
}
