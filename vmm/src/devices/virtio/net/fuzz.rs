//! The body of the `net_chains` fuzz target (vmm/fuzz), also run over the seeds by the test
//! suite: arbitrary bytes become a small guest's memory — descriptor tables, available
//! rings, buffers — and the RX ring as a hostile net VM would write it. The device's TX
//! pass and RX pass (`queues.rs`, with the notification handling) must never panic, never
//! write outside what they were given, never loop on a lying available index, and every TX
//! record they produce must carry a header that passes the TX check.
//!
//! Input: byte 0 picks the negotiated offloads (bits 0-1) and EVENT_IDX (bit 2), then 0x4000 bytes of guest memory, then
//! 0x100 bytes over the ring's control blocks (0x40..0x140: both rings' positions and
//! wake-up marks) and up to 0x2000 bytes over the start of its RX data.

use std::ptr::NonNull;

use bulkhead_netring::{
    attach, create, ring_len, Consumer, Mem, Producer, Side, HEADER_SIZE, MIN_DATA_SIZE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::header::{bit, VnetHdr, HDR_LEN, OFFLOADS};
use super::queues::{serve_rx, serve_tx};
use super::rx::RxBuffers;
use super::stats::NetStats;
use crate::vstate::memory::GuestMemoryMmap;

const MEM: usize = 0x4000;
const RING_INPUT: usize = 0x2000;
const CTL_AT: usize = 0x40;
const CTL_LEN: usize = 0x100;
const QSIZE: u16 = 16;
/// (descriptor table, available ring, used ring) of the TX and RX queues.
const TXQ: (u64, u64, u64) = (0x000, 0x100, 0x200);
const RXQ: (u64, u64, u64) = (0x400, 0x500, 0x600);

fn queue(at: (u64, u64, u64), event_idx: bool) -> Option<Queue> {
    let mut q = Queue::new(QSIZE).ok()?;
    q.set_event_idx(event_idx);
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(at.0 as u32), Some(0));
    q.set_avail_ring_address(Some(at.1 as u32), Some(0));
    q.set_used_ring_address(Some(at.2 as u32), Some(0));
    q.set_ready(true);
    Some(q)
}

/// Runs the TX pass and RX deliveries over `data` (see the module's doc); returns the
/// device's counters (the seeds test checks them).
pub fn exercise(data: &[u8]) -> NetStats {
    let stats = NetStats::default();
    let Some((&sel, rest)) = data.split_first() else {
        return stats;
    };
    let mrg = bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF);
    let features = match sel % 4 {
        0 => 0,
        1 => OFFLOADS,
        2 => mrg,
        _ => OFFLOADS | mrg,
    };
    let event_idx = sel & 4 != 0;
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return stats;
    };
    let (guest, ring_bytes) = rest.split_at(rest.len().min(MEM));
    if mem.write_slice(guest, GuestAddress(0)).is_err() {
        return stats;
    }
    let mut buf = vec![0u64; ring_len(MIN_DATA_SIZE) / 8];
    let Some(base) = NonNull::new(buf.as_mut_ptr().cast::<u8>()) else {
        return stats;
    };
    // SAFETY: `buf` is 8-aligned, outlives every use of `ring` below, and nothing else
    // touches it meanwhile.
    let ring = unsafe { Mem::new(base, buf.len() * 8) };
    let Ok(info) = create(ring, MIN_DATA_SIZE, [2, 0, 0, 0, 0, 1]) else {
        return stats;
    };

    // TX: whatever chains the bytes describe; every record must be a checked frame.
    if let Some(mut txq) = queue(TXQ, event_idx) {
        let mut p = Producer::new(ring, &info, Side::Tx);
        let _ = serve_tx(&mut txq, &mem, Some(&mut p), features, &stats);
        let mut c = Consumer::new(ring, &info, Side::Tx);
        while let Ok(Some(r)) = c.peek() {
            let rec = r.to_vec();
            let mut h = [0u8; HDR_LEN];
            h.copy_from_slice(rec.get(..HDR_LEN).unwrap_or(&[0; HDR_LEN]));
            if rec.len() < HDR_LEN
                || VnetHdr::decode(&h)
                    .check_tx(rec.len() - HDR_LEN, features)
                    .is_err()
            {
                std::process::abort(); // a bug the fuzzer must report
            }
            if c.pop(r).is_err() {
                break;
            }
        }
    }

    // RX: the ring's control blocks and the start of its RX data as a hostile net VM
    // wrote them, delivered into whatever RX chains the bytes describe.
    let (ctl, rx_data) = ring_bytes.split_at(ring_bytes.len().min(CTL_LEN));
    let _ = ring.write(CTL_AT, ctl);
    let _ = ring.write(
        HEADER_SIZE + info.data_size,
        rx_data.get(..rx_data.len().min(RING_INPUT)).unwrap_or(&[]),
    );
    let Ok(seen) = attach(ring) else {
        return stats;
    };
    let Some(mut rxq) = queue(RXQ, event_idx) else {
        return stats;
    };
    let mut c = Consumer::new(ring, &seen, Side::Rx);
    let mut bufs = RxBuffers::default();
    let used = serve_rx(&mut rxq, &mem, &mut c, &mut bufs, features, &stats).map_or(0, |s| s.used);
    if used > u32::from(QSIZE) {
        std::process::abort(); // more buffers used than the guest could have posted
    }
    stats
}
