//! The RX queue: frames from the RX ring into the buffers the guest posts. With mergeable
//! receive buffers (`VIRTIO_NET_F_MRG_RXBUF`) a frame spans as many chains as it needs
//! (`num_buffers` in its header says how many); without, it must fit one chain. Chains are
//! checked (device-writable only, inside guest memory, room for a header) as they are taken;
//! an unusable one is returned empty and counted. Chains taken for a frame that does not fit
//! yet wait in a stash for the next buffers, so nothing is handed back twice. Frames from
//! the net VM are checked too: their header must only use offloads the guest accepted.

use std::collections::VecDeque;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::header::{VnetHdr, ETH_HLEN, HDR_LEN, MAX_GSO_FRAME};
use super::stats::{add, NetStats};
use crate::vstate::memory::GuestMemoryMmap;

/// One RX chain: its head and its (device-writable, checked) buffers.
#[derive(Debug, Clone)]
pub struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, usize)>,
    cap: usize,
}

/// Checks an RX chain; `None` if it cannot be used.
pub fn check_chain(
    mem: &GuestMemoryMmap,
    head: u16,
    descs: &[Descriptor],
    mrg: bool,
) -> Option<RxChain> {
    if descs.last().is_none_or(|d| d.has_next()) {
        return None; // broken off: a next descriptor that does not exist, or a loop
    }
    let mut bufs = Vec::with_capacity(descs.len());
    let mut cap = 0usize;
    for d in descs {
        let len = d.len() as usize;
        if !d.is_write_only() || !mem.check_range(GuestAddress(d.addr().0), len) {
            return None;
        }
        cap = cap.checked_add(len)?;
        if len > 0 {
            bufs.push((GuestAddress(d.addr().0), len));
        }
    }
    // Every buffer must hold at least a header (the spec's rule for mergeable buffers;
    // without them, a chain shorter than a header and a minimal frame is useless too).
    let min = if mrg { HDR_LEN } else { HDR_LEN + ETH_HLEN };
    (cap >= min).then_some(RxChain { head, bufs, cap })
}

/// What happened to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written into this many chains.
    Done(u16),
    /// Not enough buffers yet: the frame stays in the ring.
    NoBuffers,
    /// Dropped (counted): a bad header or length, or too big for one buffer.
    Dropped,
}

/// The guest's RX buffers as the device takes them.
#[derive(Debug, Default)]
pub struct RxBuffers {
    stash: VecDeque<RxChain>,
}

impl RxBuffers {
    /// Forgets the stash (device reset: the queue is gone).
    pub fn clear(&mut self) {
        self.stash.clear();
    }

    /// Chains taken but not used yet.
    pub fn stashed(&self) -> usize {
        self.stash.len()
    }

    /// Takes chains until their room reaches `need` (mergeable) or one chain is there.
    /// Returns false if the queue ran dry first (what was taken stays stashed). Unusable
    /// chains are returned empty at once.
    fn gather(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        need: usize,
        mrg: bool,
        stats: &NetStats,
        used: &mut u32,
    ) -> bool {
        loop {
            let have: usize = self.stash.iter().map(|c| c.cap).sum();
            let enough = if mrg {
                have >= need
            } else {
                !self.stash.is_empty()
            };
            if enough {
                return true;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            match check_chain(mem, head, &descs, mrg) {
                Some(c) => self.stash.push_back(c),
                None => {
                    add(&stats.rx_bad_chains, 1);
                    if queue.add_used(mem, head, 0).is_ok() {
                        *used += 1;
                    }
                }
            }
        }
    }

    /// Delivers one frame (`src`: its header and bytes, in the ring) into the guest's
    /// buffers. `features`: what the guest's driver accepted.
    pub fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        src: &VolatileSlice<'_>,
        features: u64,
        stats: &NetStats,
        used: &mut u32,
    ) -> Delivery {
        let mrg =
            features & super::header::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF) != 0;
        let len = src.len();
        if !(HDR_LEN + ETH_HLEN..=HDR_LEN + MAX_GSO_FRAME).contains(&len) {
            add(&stats.rx_malformed, 1);
            return Delivery::Dropped;
        }
        let mut raw = [0u8; HDR_LEN];
        src.copy_to(&mut raw[..]);
        let mut hdr = VnetHdr::decode(&raw);
        if let Err(e) = hdr.check_rx(len - HDR_LEN, features) {
            log::debug!("bulkhead-vmm: virtio-net: RX frame from the net VM dropped: {e}");
            add(&stats.rx_malformed, 1);
            return Delivery::Dropped;
        }
        if !self.gather(queue, mem, len, mrg, stats, used) {
            return Delivery::NoBuffers;
        }
        if !mrg && self.stash.front().is_some_and(|c| c.cap < len) {
            // Keep the buffer for a frame that fits.
            add(&stats.rx_too_big, 1);
            return Delivery::Dropped;
        }
        // Which chains this frame takes.
        let mut take = 0usize;
        let mut room = 0usize;
        for c in &self.stash {
            take += 1;
            room += c.cap;
            if room >= len || !mrg {
                break;
            }
        }
        hdr.num_buffers = if mrg { take as u16 } else { 1 };
        let hdr_bytes = hdr.encode();
        let mut off = 0usize; // bytes of the frame (header included) written so far
        for _ in 0..take {
            let Some(chain) = self.stash.pop_front() else {
                break;
            };
            let mut written = 0usize;
            for (addr, blen) in &chain.bufs {
                if off >= len {
                    break;
                }
                let n = (*blen).min(len - off);
                let Ok(dst) = mem.get_slice(*addr, n) else {
                    break; // checked when taken; memory does not shrink
                };
                // The header comes from our checked copy, the rest from the ring.
                let mut pos = 0usize;
                while pos < n {
                    let at = off + pos;
                    if at < HDR_LEN {
                        let k = (HDR_LEN - at).min(n - pos);
                        if let (Ok(d), Some(h)) = (dst.subslice(pos, k), hdr_bytes.get(at..at + k))
                        {
                            d.copy_from(h);
                        }
                        pos += k;
                    } else {
                        let k = n - pos;
                        if let (Ok(s), Ok(d)) = (src.subslice(at, k), dst.subslice(pos, k)) {
                            s.copy_to_volatile_slice(d);
                        }
                        pos += k;
                    }
                }
                off += n;
                written += n;
            }
            if queue.add_used(mem, chain.head, written as u32).is_ok() {
                *used += 1;
            }
        }
        add(&stats.rx_frames, 1);
        add(&stats.rx_bytes, len as u64);
        Delivery::Done(take as u16)
    }
}
