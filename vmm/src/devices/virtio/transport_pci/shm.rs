//! BAR 2: the device's shared-memory regions, back to back.

use super::super::{ShmRegion, ShmRegionSpec};

const PAGE: u64 = 4096;

/// The regions laid out back to back from `base`, each 4 KiB-aligned.
pub fn shm_layout(specs: &[ShmRegionSpec], base: u64) -> Vec<ShmRegion> {
    let mut off = 0u64;
    specs
        .iter()
        .map(|s| {
            let r = ShmRegion {
                id: s.id,
                guest_addr: base + off,
                size: s.size,
            };
            off += s.size.div_ceil(PAGE) * PAGE;
            r
        })
        .collect()
}

/// The BAR size for the regions (a power of two), or None when there are none.
pub fn shm_bar_size(specs: &[ShmRegionSpec]) -> Option<u64> {
    let total: u64 = specs.iter().map(|s| s.size.div_ceil(PAGE) * PAGE).sum();
    (total > 0).then(|| total.next_power_of_two().max(PAGE))
}
