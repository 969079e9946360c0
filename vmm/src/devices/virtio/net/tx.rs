//! The TX queue: each chain the guest posts is one frame (`virtio_net_hdr_v1` then the
//! Ethernet frame, laid out over any number of device-readable descriptors). Every chain is
//! checked — direction, addresses, length, header against the negotiated offloads — before
//! one byte reaches the ring; a malformed chain is returned to the guest unused and counted,
//! never a panic. A good frame is copied straight from guest memory into the TX ring.

use bulkhead_netring::{Producer, RingError};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::header::{VnetHdr, HDR_LEN, MAX_GSO_FRAME};
use super::stats::{add, NetStats};
use crate::vstate::memory::GuestMemoryMmap;

/// Why a TX chain was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// A device-writable descriptor in a TX chain.
    #[error("a device-writable descriptor in a TX chain")]
    WriteOnly,
    /// Shorter than a header and an Ethernet header, or longer than any frame.
    #[error("a {0}-byte chain")]
    Length(u64),
    /// A buffer outside guest memory.
    #[error("a buffer outside guest memory")]
    Address,
    /// The chain breaks off: its last descriptor names a next one that does not exist, or
    /// it loops.
    #[error("a broken descriptor chain")]
    Broken,
    /// The header asks for something not negotiated, or does not fit the frame.
    #[error(transparent)]
    Header(#[from] super::header::HdrError),
}

/// A checked TX chain: its header and where its bytes are.
#[derive(Debug)]
pub struct TxFrame {
    /// The header as the guest wrote it (checked).
    pub hdr: VnetHdr,
    /// Bytes of the chain: header and frame.
    pub len: usize,
}

/// Copies bytes `[skip, skip + dst.len())` of the chain `descs` into `dst`. Every range is
/// checked against guest memory first.
pub fn copy_from_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut skip: usize,
    dst: &VolatileSlice<'_>,
) -> Result<(), TxError> {
    let mut done = 0usize;
    for d in descs {
        if done == dst.len() {
            break;
        }
        let len = d.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(dst.len() - done);
        let src_addr = d
            .addr()
            .0
            .checked_add(skip as u64)
            .map(GuestAddress)
            .ok_or(TxError::Address)?;
        let src = mem.get_slice(src_addr, n).map_err(|_| TxError::Address)?;
        let to = dst.subslice(done, n).map_err(|_| TxError::Address)?;
        src.copy_to_volatile_slice(to);
        done += n;
        skip = 0;
    }
    if done != dst.len() {
        return Err(TxError::Length(done as u64));
    }
    Ok(())
}

/// Checks a TX chain: direction, length, addresses and header (against `features`).
pub fn parse(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    features: u64,
) -> Result<TxFrame, TxError> {
    if descs.last().is_none_or(|d| d.has_next()) {
        return Err(TxError::Broken);
    }
    let mut total = 0u64;
    for d in descs {
        if d.is_write_only() {
            return Err(TxError::WriteOnly);
        }
        total += u64::from(d.len());
        if !mem.check_range(GuestAddress(d.addr().0), d.len() as usize) {
            return Err(TxError::Address);
        }
    }
    if total < (HDR_LEN + super::header::ETH_HLEN) as u64
        || total > (HDR_LEN + MAX_GSO_FRAME) as u64
    {
        return Err(TxError::Length(total));
    }
    let mut raw = [0u8; HDR_LEN];
    copy_from_chain(mem, descs, 0, &VolatileSlice::from(&mut raw[..]))?;
    let hdr = VnetHdr::decode(&raw);
    let len = total as usize;
    hdr.check_tx(len - HDR_LEN, features)?;
    Ok(TxFrame { hdr, len })
}

/// What one pass over the TX queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TxPass {
    /// Chains returned to the guest.
    pub used: u32,
    /// Frames put in the ring.
    pub frames: u32,
    /// The ring was full: the chain at the head stays for later.
    pub ring_full: bool,
}

/// Moves the guest's TX chains into `ring` (or, with no ring: the link is down, drops
/// them). A frame whose header the guest wrote is stored with the header as checked, its
/// `num_buffers` zeroed.
pub fn process(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut ring: Option<&mut Producer>,
    features: u64,
    stats: &NetStats,
) -> Result<TxPass, RingError> {
    let mut pass = TxPass::default();
    loop {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(pass);
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let parsed = parse(mem, &descs, features);
        match (&mut ring, parsed) {
            (_, Err(e)) => {
                if super::stats::get(&stats.tx_malformed) == 0 {
                    log::warn!("bulkhead-vmm: virtio-net: TX chain dropped: {e} (further ones are counted)");
                } else {
                    log::debug!("bulkhead-vmm: virtio-net: TX chain dropped: {e}");
                }
                add(&stats.tx_malformed, 1);
            }
            (None, Ok(_)) => add(&stats.tx_link_down, 1),
            (Some(p), Ok(frame)) => {
                let Some(r) = p.reserve(frame.len)? else {
                    queue.go_to_previous_position();
                    pass.ring_full = true;
                    return Ok(pass);
                };
                // SAFETY: the reservation is `frame.len` bytes inside the ring's live
                // mapping, which only this producer writes until it commits.
                let dst = unsafe { VolatileSlice::new(r.ptr(), r.len()) };
                let mut hdr = frame.hdr;
                hdr.num_buffers = 0;
                dst.copy_from(&hdr.encode());
                let body = dst
                    .offset(HDR_LEN)
                    .map_err(|e| RingError::Map(e.to_string()))?;
                match copy_from_chain(mem, &descs, HDR_LEN, &body) {
                    Ok(()) => {
                        p.commit(r, frame.len)?;
                        add(&stats.tx_frames, 1);
                        add(&stats.tx_bytes, frame.len as u64);
                        pass.frames += 1;
                    }
                    // Checked in `parse`; a chain that changed meanwhile is dropped.
                    Err(_) => add(&stats.tx_malformed, 1),
                }
            }
        }
        if queue.add_used(mem, head, 0).is_err() {
            log::warn!("bulkhead-vmm: virtio-net: cannot return TX buffer {head}");
            return Ok(pass);
        }
        pass.used += 1;
    }
}
