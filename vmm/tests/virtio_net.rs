//! virtio-net's two data paths on virtio-queue's mock driver side and a real ring (crate
//! bulkhead-netring over plain memory): TX chains of every shape into the ring, malformed
//! TX chains dropped and counted (never a panic, never a byte in the ring), a full ring
//! leaving the chain for later; RX frames into single and mergeable buffers, unusable RX
//! chains, frames the guest has no room for yet, and frames from the net VM whose header
//! asks for offloads the guest did not accept.

mod common;

use bulkhead_netring::{Consumer, Side};
use bulkhead_vmm::devices::virtio::net::header::{bit, VnetHdr, HDR_LEN, OFFLOADS};
use bulkhead_vmm::devices::virtio::net::rx::{Delivery, RxBuffers};
use bulkhead_vmm::devices::virtio::net::stats::{get, NetStats};
use bulkhead_vmm::devices::virtio::net::tx;
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use common::netring::TestRing as Ring;
use virtio_bindings::virtio_net as vn;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, VolatileSlice};

const QUEUE: u64 = 0x1_0000;
const BUF: u64 = 0x10_0000;
const MRG: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f
}

fn plain_hdr() -> [u8; HDR_LEN] {
    VnetHdr::default().encode()
}

fn tso4_hdr(num_buffers: u16) -> [u8; HDR_LEN] {
    VnetHdr {
        flags: vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers,
    }
    .encode()
}

struct Txq<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    q: Queue,
    next_desc: u16,
}

impl<'a> Txq<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(QUEUE), 256);
        let q = mock.create_queue().unwrap();
        Txq {
            mock,
            q,
            next_desc: 0,
        }
    }
    fn add(&mut self, parts: &[(u64, u32, bool)]) {
        self.mock
            .add_desc_chains(&common::chain(self.next_desc, parts), self.next_desc)
            .unwrap();
        self.next_desc += parts.len() as u16;
    }
    fn add_raw(&mut self, descs: &[RawDescriptor]) {
        self.mock.add_desc_chains(descs, self.next_desc).unwrap();
        self.next_desc += descs.len() as u16;
    }
    fn used(&self) -> u16 {
        self.mock.used().idx().load()
    }
    fn used_len(&self, i: usize) -> u32 {
        self.mock.used().ring().ref_at(i).unwrap().load().len()
    }
}

fn records(c: &mut Consumer) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(r) = c.peek().unwrap() {
        out.push(r.to_vec());
        c.pop(r).unwrap();
    }
    out
}

#[test]
fn tx_frames_of_every_layout_arrive_whole_with_a_clean_header() {
    let mem = common::memory();
    let mut ring = Ring::new();
    let (mut p, mut c) = ring.ends(Side::Tx);
    let stats = NetStats::default();
    let mut q = Txq::new(&mem);
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    let f3 = frame(30_000, 3);
    // Header and frame in one descriptor.
    let mut one = plain_hdr().to_vec();
    one.extend_from_slice(&f1);
    mem.write_slice(&one, GuestAddress(BUF)).unwrap();
    q.add(&[(BUF, one.len() as u32, false)]);
    // Header split across two descriptors, frame in three more.
    let mut h = plain_hdr();
    h[10] = 7; // num_buffers from the guest: not passed on
    mem.write_slice(&h[..5], GuestAddress(BUF + 0x1_0000))
        .unwrap();
    mem.write_slice(&h[5..], GuestAddress(BUF + 0x1_1000))
        .unwrap();
    mem.write_slice(&f2[..100], GuestAddress(BUF + 0x1_2000))
        .unwrap();
    mem.write_slice(&f2[100..1000], GuestAddress(BUF + 0x1_3000))
        .unwrap();
    mem.write_slice(&f2[1000..], GuestAddress(BUF + 0x1_4000))
        .unwrap();
    q.add(&[
        (BUF + 0x1_0000, 5, false),
        (BUF + 0x1_1000, 7, false),
        (BUF + 0x1_2000, 100, false),
        (BUF + 0x1_3000, 900, false),
        (BUF + 0x1_4000, (f2.len() - 1000) as u32, false),
    ]);
    // A TSO frame (the guest negotiated CSUM and HOST_TSO4).
    mem.write_slice(&tso4_hdr(0), GuestAddress(BUF + 0x2_0000))
        .unwrap();
    mem.write_slice(&f3, GuestAddress(BUF + 0x3_0000)).unwrap();
    q.add(&[
        (BUF + 0x2_0000, HDR_LEN as u32, false),
        (BUF + 0x3_0000, f3.len() as u32, false),
    ]);
    let pass = tx::process(&mut q.q, &mem, Some(&mut p), OFFLOADS | MRG, &stats).unwrap();
    assert_eq!((pass.used, pass.frames, pass.ring_full), (3, 3, false));
    assert_eq!(q.used(), 3);
    let got = records(&mut c);
    assert_eq!(got.len(), 3);
    assert_eq!(&got[0][..HDR_LEN], &plain_hdr());
    assert_eq!(&got[0][HDR_LEN..], &f1[..]);
    assert_eq!(&got[1][..HDR_LEN], &plain_hdr(), "num_buffers zeroed");
    assert_eq!(&got[1][HDR_LEN..], &f2[..]);
    assert_eq!(&got[2][..HDR_LEN], &tso4_hdr(0));
    assert_eq!(&got[2][HDR_LEN..], &f3[..]);
    assert_eq!(get(&stats.tx_frames), 3);
    assert_eq!(get(&stats.tx_malformed), 0);
}

#[test]
fn malformed_tx_chains_are_dropped_counted_and_returned_and_the_next_frame_goes_through() {
    let mem = common::memory();
    let mut ring = Ring::new();
    let (mut p, mut c) = ring.ends(Side::Tx);
    let stats = NetStats::default();
    let mut q = Txq::new(&mem);
    let good = {
        let mut v = plain_hdr().to_vec();
        v.extend_from_slice(&frame(100, 9));
        v
    };
    mem.write_slice(&good, GuestAddress(BUF)).unwrap();
    mem.write_slice(&tso4_hdr(0), GuestAddress(BUF + 0x1000))
        .unwrap();
    mem.write_slice(&frame(3000, 1), GuestAddress(BUF + 0x2000))
        .unwrap();
    let mut valid_flag = plain_hdr();
    valid_flag[0] = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;
    mem.write_slice(&valid_flag, GuestAddress(BUF + 0x8000))
        .unwrap();
    let mut udp = tso4_hdr(0);
    udp[1] = vn::VIRTIO_NET_HDR_GSO_UDP as u8;
    mem.write_slice(&udp, GuestAddress(BUF + 0x9000)).unwrap();
    let end_of_ram = 32u64 << 20;
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        // A device-writable buffer in a TX chain.
        vec![(BUF, good.len() as u32, true)],
        vec![(BUF, 12, false), (BUF + 12, 100, true)],
        // Shorter than a header and an Ethernet header.
        vec![(BUF, 25, false)],
        vec![(BUF, 0, false)],
        // Outside guest memory, or running off its end.
        vec![(end_of_ram + 0x1000, 200, false)],
        vec![(end_of_ram - 50, 200, false)],
        vec![(u64::MAX - 10, 200, false)],
        // Longer than any frame.
        vec![
            (BUF, 0x8000, false),
            (BUF, 0x8000, false),
            (BUF, 0x8000, false),
        ],
        // A plain frame over the MTU.
        vec![(BUF + 0x2000 - 12, 12, false), (BUF + 0x2000, 3000, false)],
        // TSO that was not negotiated (no HOST_TSO4 below): see the next pass.
        // A receive-only flag, a UDP GSO type.
        vec![(BUF + 0x8000, 12, false), (BUF + 0x2000, 100, false)],
        vec![(BUF + 0x9000, 12, false), (BUF + 0x2000, 3000, false)],
    ];
    for chain in &bad {
        q.add(chain);
    }
    // A chain whose descriptor points at a missing next one (index out of the table).
    q.add_raw(&[RawDescriptor::from(SplitDescriptor::new(BUF, 200, 1, 999))]);
    // A loop: two descriptors naming each other.
    let a = q.next_desc;
    q.add_raw(&[
        RawDescriptor::from(SplitDescriptor::new(BUF, 60, 1, a + 1)),
        RawDescriptor::from(SplitDescriptor::new(BUF, 60, 1, a)),
    ]);
    q.add(&[(BUF, good.len() as u32, false)]);
    let pass = tx::process(&mut q.q, &mem, Some(&mut p), OFFLOADS, &stats).unwrap();
    assert_eq!(pass.used as usize, bad.len() + 3, "every chain returned");
    assert_eq!(pass.frames, 1);
    assert_eq!(get(&stats.tx_malformed), bad.len() as u64 + 2);
    for i in 0..q.used() as usize {
        assert_eq!(
            q.used_len(i),
            0,
            "TX chains are returned with nothing written"
        );
    }
    let got = records(&mut c);
    assert_eq!(got, vec![good.clone()]);

    // The same TSO frame without HOST_TSO4 negotiated is refused, with it accepted.
    q.add(&[(BUF + 0x1000, 12, false), (BUF + 0x2000, 3000, false)]);
    tx::process(
        &mut q.q,
        &mem,
        Some(&mut p),
        OFFLOADS & !bit(vn::VIRTIO_NET_F_HOST_TSO4),
        &stats,
    )
    .unwrap();
    assert_eq!(get(&stats.tx_malformed), bad.len() as u64 + 3);
    q.add(&[(BUF + 0x1000, 12, false), (BUF + 0x2000, 3000, false)]);
    tx::process(&mut q.q, &mem, Some(&mut p), OFFLOADS, &stats).unwrap();
    assert_eq!(records(&mut c).len(), 1);
    assert_eq!(get(&stats.tx_frames), 2);
}

#[test]
fn a_full_ring_keeps_the_chain_and_no_link_drops_it() {
    let mem = common::memory();
    let mut ring = Ring::new();
    let (mut p, mut c) = ring.ends(Side::Tx);
    let stats = NetStats::default();
    let mut q = Txq::new(&mem);
    let big = {
        let mut v = tso4_hdr(0).to_vec();
        v.extend_from_slice(&frame(60_000, 4));
        v
    };
    mem.write_slice(&big, GuestAddress(BUF)).unwrap();
    for _ in 0..6 {
        q.add(&[(BUF, big.len() as u32, false)]);
    }
    let pass = tx::process(&mut q.q, &mem, Some(&mut p), OFFLOADS, &stats).unwrap();
    assert!(pass.ring_full);
    assert_eq!(pass.frames, 4, "a 256 KiB ring holds four 60 KB frames");
    assert_eq!(q.used(), 4, "the fifth chain waits in the queue");
    assert_eq!(records(&mut c).len(), 4);
    let pass = tx::process(&mut q.q, &mem, Some(&mut p), OFFLOADS, &stats).unwrap();
    assert_eq!((pass.frames, pass.ring_full), (2, false));
    // Link down: chains are returned and counted, nothing is kept.
    q.add(&[(BUF, big.len() as u32, false)]);
    let pass = tx::process(&mut q.q, &mem, None, OFFLOADS, &stats).unwrap();
    assert_eq!((pass.used, pass.frames), (1, 0));
    assert_eq!(get(&stats.tx_link_down), 1);
}

/// An RX queue with chains of the given sizes (one writable descriptor each, unless
/// `parts` says more).
struct Rxq<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    q: Queue,
    next_desc: u16,
    next_buf: u64,
}

impl<'a> Rxq<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(QUEUE), 256);
        let q = mock.create_queue().unwrap();
        Rxq {
            mock,
            q,
            next_desc: 0,
            next_buf: BUF,
        }
    }
    fn post(&mut self, sizes: &[u32]) -> Vec<u64> {
        let mut addrs = Vec::new();
        for s in sizes {
            let a = self.next_buf;
            self.next_buf += u64::from(*s).next_multiple_of(0x1000);
            addrs.push(a);
            self.mock
                .add_desc_chains(
                    &common::chain(self.next_desc, &[(a, *s, true)]),
                    self.next_desc,
                )
                .unwrap();
            self.next_desc += 1;
        }
        addrs
    }
    fn post_chain(&mut self, parts: &[(u64, u32, bool)]) {
        self.mock
            .add_desc_chains(&common::chain(self.next_desc, parts), self.next_desc)
            .unwrap();
        self.next_desc += parts.len() as u16;
    }
    fn used(&self) -> Vec<(u32, u32)> {
        (0..self.mock.used().idx().load() as usize)
            .map(|i| {
                let e = self.mock.used().ring().ref_at(i).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }
}

fn deliver(
    bufs: &mut RxBuffers,
    q: &mut Rxq<'_>,
    mem: &GuestMemoryMmap,
    rec: &mut [u8],
    features: u64,
    stats: &NetStats,
) -> Delivery {
    let src = VolatileSlice::from(rec);
    let mut used = 0;
    bufs.deliver(&mut q.q, mem, &src, features, stats, &mut used)
}

#[test]
fn rx_frames_spread_over_mergeable_buffers_with_num_buffers_set() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut q = Rxq::new(&mem);
    let mut bufs = RxBuffers::default();
    let addrs = q.post(&[4096; 10]);
    let f = frame(30_000, 5);
    let mut rec = tso4_hdr(99).to_vec();
    rec.extend_from_slice(&f);
    let d = deliver(&mut bufs, &mut q, &mem, &mut rec, OFFLOADS | MRG, &stats);
    assert_eq!(d, Delivery::Done(8), "30 012 bytes in 4 KiB buffers");
    let used = q.used();
    assert_eq!(used.len(), 8);
    assert_eq!(used.iter().map(|u| u.1 as usize).sum::<usize>(), rec.len());
    let mut got = Vec::new();
    for (i, (_, len)) in used.iter().enumerate() {
        let mut b = vec![0u8; *len as usize];
        mem.read_slice(&mut b, GuestAddress(addrs[i])).unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(
        &got[..HDR_LEN],
        &tso4_hdr(8),
        "num_buffers = 8, the rest as sent"
    );
    assert_eq!(&got[HDR_LEN..], &f[..]);
    assert_eq!(bufs.stashed(), 0);

    // Two buffers left: a frame that needs three waits (stays in the ring), and goes once
    // one more is posted.
    let mut rec2 = plain_hdr().to_vec();
    rec2.extend_from_slice(&frame(1514, 6));
    let mut small = [plain_hdr().to_vec(), frame(60, 7)].concat();
    for _ in 0..2 {
        assert_eq!(
            deliver(&mut bufs, &mut q, &mem, &mut small, OFFLOADS | MRG, &stats),
            Delivery::Done(1)
        );
    }
    q.post(&[500, 500]);
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut rec2, OFFLOADS | MRG, &stats),
        Delivery::NoBuffers
    );
    assert_eq!(bufs.stashed(), 2, "taken and kept, not returned");
    q.post(&[1000]);
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut rec2, OFFLOADS | MRG, &stats),
        Delivery::Done(3)
    );
    assert_eq!(get(&stats.rx_frames), 4);
}

#[test]
fn rx_without_mergeable_buffers_needs_one_big_enough_chain() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut q = Rxq::new(&mem);
    let mut bufs = RxBuffers::default();
    q.post(&[1526]);
    let mut big = [plain_hdr().to_vec(), frame(1514, 1)].concat();
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut big, 0, &stats),
        Delivery::Done(1)
    );
    let mut tso = [tso4_hdr(0).to_vec(), frame(3000, 1)].concat();
    q.post(&[1526]);
    // Not negotiated: dropped as malformed.
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut tso, 0, &stats),
        Delivery::Dropped
    );
    assert_eq!(get(&stats.rx_malformed), 1);
    // Negotiated but the buffer is too small: dropped, the buffer kept for the next.
    let feats = OFFLOADS;
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut tso, feats, &stats),
        Delivery::Dropped
    );
    assert_eq!(get(&stats.rx_too_big), 1);
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut big, feats, &stats),
        Delivery::Done(1)
    );
    let used = q.used();
    assert_eq!(used.len(), 2);
    let mut hdr = [0u8; HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(VnetHdr::decode(&hdr).num_buffers, 1);
}

#[test]
fn unusable_rx_chains_are_returned_empty_and_bad_frames_from_the_net_vm_dropped() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut q = Rxq::new(&mem);
    let mut bufs = RxBuffers::default();
    let end_of_ram = 32u64 << 20;
    q.post_chain(&[(BUF, 2048, false)]); // device-readable
    q.post_chain(&[(BUF, 8, true)]); // shorter than a header
    q.post_chain(&[(end_of_ram, 2048, true)]); // outside memory
    q.post_chain(&[(BUF, 1024, true), (BUF + 0x1000, 1024, false)]);
    q.post(&[2048]);
    let mut f = [plain_hdr().to_vec(), frame(200, 3)].concat();
    assert_eq!(
        deliver(&mut bufs, &mut q, &mem, &mut f, MRG, &stats),
        Delivery::Done(1)
    );
    assert_eq!(get(&stats.rx_bad_chains), 4);
    let used = q.used();
    assert_eq!(used.len(), 5);
    assert!(used[..4].iter().all(|(_, len)| *len == 0));
    assert_eq!(used[4].1 as usize, f.len());
    // Frames the net VM should never send: too short, too long, bad flags.
    for mut bad in [
        vec![0u8; HDR_LEN + 5],
        vec![0u8; 70_000],
        [
            {
                let mut h = plain_hdr();
                h[0] = 0x80;
                h.to_vec()
            },
            frame(100, 1),
        ]
        .concat(),
    ] {
        assert_eq!(
            deliver(&mut bufs, &mut q, &mem, &mut bad, OFFLOADS | MRG, &stats),
            Delivery::Dropped
        );
    }
    assert_eq!(get(&stats.rx_malformed), 3);
}
