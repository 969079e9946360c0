//! The header page: where everything is, written by the creator (the app VM's VMM) and
//! checked by the side that attaches (bulkhead-netd).

use std::sync::atomic::Ordering;

use crate::mem::Mem;
use crate::ring::Side;
use crate::RingError;

/// "BHNR", little-endian.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"BHNR");
/// The layout version this crate speaks.
pub const RING_VERSION: u32 = 1;
/// The header page.
pub const HEADER_SIZE: usize = 4096;
/// A record's header: payload length (u32) and kind (u32).
pub const RECORD_HEADER: usize = 8;
/// The largest payload: a 12-byte `virtio_net_hdr_v1` and a 64 KiB GSO frame with its
/// Ethernet and VLAN headers, with room to spare.
pub const MAX_PAYLOAD: usize = 65536 + 1024;
/// Smallest data ring: a largest record, a pad before it, and as much again.
pub const MIN_DATA_SIZE: usize = 256 * 1024;
/// Largest data ring.
pub const MAX_DATA_SIZE: usize = 16 * 1024 * 1024;
/// What the VMM uses: 1 MiB each way (16 GSO frames or ~650 full-size ones in flight).
pub const DEFAULT_DATA_SIZE: usize = 1024 * 1024;

pub(crate) const OFF_MAGIC: usize = 0x00;
pub(crate) const OFF_VERSION: usize = 0x04;
pub(crate) const OFF_DATA_SIZE: usize = 0x08;
pub(crate) const OFF_MAC: usize = 0x10;
pub(crate) const OFF_FEATURES: usize = 0x18;
/// Control blocks: producer's cache line (prod, space_at), then consumer's (cons, kick_at).
pub(crate) const OFF_CTL_TX: usize = 0x40;
pub(crate) const OFF_CTL_RX: usize = 0xc0;
pub(crate) const CTL_PROD: usize = 0x00;
pub(crate) const CTL_SPACE_AT: usize = 0x04;
pub(crate) const CTL_CONS: usize = 0x40;
pub(crate) const CTL_KICK_AT: usize = 0x44;

/// Bytes of a ring memfd with `data_size`-byte rings.
pub fn ring_len(data_size: usize) -> usize {
    HEADER_SIZE + 2 * data_size
}

/// What the header says (read once, at attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingInfo {
    /// Bytes of each data ring.
    pub data_size: usize,
    /// The app VM's MAC address (the source address of every frame it may send).
    pub mac: [u8; 6],
}

impl RingInfo {
    /// Where ring `side`'s control block and data are.
    pub(crate) fn offsets(&self, side: Side) -> (usize, usize) {
        match side {
            Side::Tx => (OFF_CTL_TX, HEADER_SIZE),
            Side::Rx => (OFF_CTL_RX, HEADER_SIZE + self.data_size),
        }
    }
}

fn check_size(data_size: usize) -> Result<(), RingError> {
    if !data_size.is_power_of_two() || !(MIN_DATA_SIZE..=MAX_DATA_SIZE).contains(&data_size) {
        return Err(RingError::BadHeader(format!(
            "data size {data_size} is not a power of two in {MIN_DATA_SIZE}..={MAX_DATA_SIZE}"
        )));
    }
    Ok(())
}

/// Lays out a fresh ring in `mem` (zeroed positions, the header) for the VM with `mac`.
pub fn create(mem: Mem, data_size: usize, mac: [u8; 6]) -> Result<RingInfo, RingError> {
    check_size(data_size)?;
    if mem.len() < ring_len(data_size) {
        return Err(RingError::Map(format!(
            "a {}-byte mapping cannot hold {}-byte rings",
            mem.len(),
            data_size
        )));
    }
    mem.write(0, &[0u8; HEADER_SIZE])?;
    mem.write_u32(OFF_VERSION, RING_VERSION)?;
    mem.write_u32(OFF_DATA_SIZE, data_size as u32)?;
    mem.write(OFF_MAC, &mac)?;
    mem.atomic_u64(OFF_FEATURES)?.store(0, Ordering::Release);
    // The magic last: a reader that sees it sees the rest.
    std::sync::atomic::fence(Ordering::Release);
    mem.write_u32(OFF_MAGIC, RING_MAGIC)?;
    Ok(RingInfo { data_size, mac })
}

/// Checks the header of a ring the peer created in `mem` (a mapping of exactly the length
/// the peer announced) and reads it once.
pub fn attach(mem: Mem) -> Result<RingInfo, RingError> {
    if mem.len() < HEADER_SIZE {
        return Err(RingError::BadHeader(format!(
            "{} bytes: shorter than the header",
            mem.len()
        )));
    }
    let magic = mem.read_u32(OFF_MAGIC)?;
    if magic != RING_MAGIC {
        return Err(RingError::BadHeader(format!("magic {magic:#010x}")));
    }
    std::sync::atomic::fence(Ordering::Acquire);
    let version = mem.read_u32(OFF_VERSION)?;
    if version != RING_VERSION {
        return Err(RingError::BadHeader(format!(
            "version {version} (this side speaks {RING_VERSION})"
        )));
    }
    let data_size = mem.read_u32(OFF_DATA_SIZE)? as usize;
    check_size(data_size)?;
    if mem.len() != ring_len(data_size) {
        return Err(RingError::BadHeader(format!(
            "{}-byte rings need {} bytes, the mapping has {}",
            data_size,
            ring_len(data_size),
            mem.len()
        )));
    }
    let mut mac = [0u8; 6];
    mem.read(OFF_MAC, &mut mac)?;
    Ok(RingInfo { data_size, mac })
}

/// The virtio-net features the app VM's driver negotiated (offloads), which the creator
/// updates when its guest (re)activates the device; the net VM reads them at each doorbell.
pub fn features(mem: Mem) -> Result<u64, RingError> {
    Ok(mem.atomic_u64(OFF_FEATURES)?.load(Ordering::Acquire))
}

/// Publishes the negotiated features (the creator's side).
pub fn set_features(mem: Mem, features: u64) -> Result<(), RingError> {
    mem.atomic_u64(OFF_FEATURES)?
        .store(features, Ordering::Release);
    Ok(())
}
