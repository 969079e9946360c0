//! Counters of one virtio-net device, shared by its threads (relaxed atomics: they are
//! reports, not synchronisation).

use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to frames and chains so far.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames from the guest put in the TX ring.
    pub tx_frames: AtomicU64,
    /// Their bytes (headers included).
    pub tx_bytes: AtomicU64,
    /// TX chains dropped as malformed (bad shape, direction, address, length or header).
    pub tx_malformed: AtomicU64,
    /// TX frames dropped because the link was down.
    pub tx_link_down: AtomicU64,
    /// Frames from the net VM given to the guest.
    pub rx_frames: AtomicU64,
    /// Their bytes (headers included).
    pub rx_bytes: AtomicU64,
    /// RX frames dropped: a bad header or length from the net VM.
    pub rx_malformed: AtomicU64,
    /// RX frames dropped: larger than the guest's buffer (without mergeable buffers).
    pub rx_too_big: AtomicU64,
    /// RX chains the guest posted that were unusable (readable, too short, bad address).
    pub rx_bad_chains: AtomicU64,
    /// Times the link came up.
    pub link_ups: AtomicU64,
    /// Times it went down.
    pub link_downs: AtomicU64,
    /// Doorbells sent to the net VM.
    pub kicks_sent: AtomicU64,
    /// Doorbells received from it.
    pub kicks_received: AtomicU64,
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl NetStats {
    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "tx {} frames ({} bytes), {} malformed chains dropped, {} dropped while down; \
             rx {} frames ({} bytes), {} malformed from the net VM, {} too big, {} bad chains; \
             link up {} / down {}; doorbells {} sent, {} received",
            get(&self.tx_frames),
            get(&self.tx_bytes),
            get(&self.tx_malformed),
            get(&self.tx_link_down),
            get(&self.rx_frames),
            get(&self.rx_bytes),
            get(&self.rx_malformed),
            get(&self.rx_too_big),
            get(&self.rx_bad_chains),
            get(&self.link_ups),
            get(&self.link_downs),
            get(&self.kicks_sent),
            get(&self.kicks_received),
        )
    }
}
