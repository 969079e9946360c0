//! virtio-net's notification suppression (`queues.rs`), driven like a guest driver over
//! queues laid out in guest memory (with their `used_event` and `avail_event` fields) and a
//! real ring (crate bulkhead-netring over plain memory). Checked: the device offers
//! VIRTIO_RING_F_EVENT_IDX; after a TX pass it asks for a kick at the next chain (also while
//! the link is down) and interrupts only when `used_event` was passed; the guest's RX refills
//! cause no kick while frames find buffers, and a frame that waits for a buffer asks for
//! one at the next refill (with EVENT_IDX by `avail_event`, without it by the used ring's
//! NO_NOTIFY flag); a driver that publishes an available index the queue cannot have ends
//! the pass instead of making it spin.

mod common;

use common::driver_queue::{DriverQueue as Vq, QSIZE, VRING_USED_F_NO_NOTIFY};

use std::sync::mpsc;
use std::time::Duration;

use bulkhead_netring::{Producer, Side};
use bulkhead_vmm::devices::virtio::net::device::Net;
use bulkhead_vmm::devices::virtio::net::header::VnetHdr;
use bulkhead_vmm::devices::virtio::net::queues::{serve_rx, serve_tx, Served};
use bulkhead_vmm::devices::virtio::net::rx::RxBuffers;
use bulkhead_vmm::devices::virtio::net::stats::{get, NetStats};
use bulkhead_vmm::devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use common::netring::TestRing as NetRing;
use virtio_bindings::virtio_net as vn;
use vm_memory::{Bytes, GuestAddress};

const TXQ: u64 = 0x1_0000;
const RXQ: u64 = 0x2_0000;
const TXBUF: u64 = 0x10_0000;
const RXBUF: u64 = 0x20_0000;
const RXBUF_LEN: u32 = 2048;
const MRG: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;

/// A 60-byte frame with a plain header in guest memory at `at`; returns the chain's length.
fn tx_frame(mem: &GuestMemoryMmap, at: u64) -> u32 {
    let mut b = VnetHdr::default().encode().to_vec();
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    b.extend_from_slice(&f);
    mem.write_slice(&b, GuestAddress(at)).unwrap();
    b.len() as u32
}

/// Posts TX frames `n` times; returns how many of the posts the driver would kick for.
fn post_tx(q: &mut Vq<'_>, mem: &GuestMemoryMmap, n: u16, event_idx: bool) -> usize {
    (0..n)
        .filter(|_| {
            let at = TXBUF + 0x1000 * u64::from(q.next_desc() % QSIZE);
            let len = tx_frame(mem, at);
            q.post(at, len, false, event_idx)
        })
        .count()
}

/// Posts `n` RX buffers; returns how many of the posts the driver would kick for.
fn post_rx(q: &mut Vq<'_>, n: u16, event_idx: bool) -> usize {
    (0..n)
        .filter(|_| {
            let at = RXBUF + 0x1000 * u64::from(q.next_desc() % QSIZE);
            q.post(at, RXBUF_LEN, true, event_idx)
        })
        .count()
}

/// A frame from the net VM (header and 60 bytes) into the RX ring.
fn push_rx(p: &mut Producer) {
    let mut rec = VnetHdr::default().encode().to_vec();
    rec.extend_from_slice(&[0x5a; 60]);
    assert!(p.push(&rec).unwrap());
}

#[test]
fn the_device_offers_event_idx() {
    let net = Net::new([0x52, 0x54, 0, 0x12, 0x34, 0x56], "net@net-vm").unwrap();
    assert_ne!(net.features() & VIRTIO_RING_F_EVENT_IDX, 0);
}

#[test]
fn tx_asks_for_a_kick_at_the_next_chain_and_interrupts_only_when_used_event_is_passed() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut ring = NetRing::new();
    let (mut p, mut c) = ring.ends(Side::Tx);
    let mut vq = Vq::new(&mem, TXQ);
    let mut q = vq.queue(true);
    // The driver wants an interrupt once entry 4 is used (Linux sets this when its TX queue
    // fills up: virtqueue_enable_cb_delayed).
    vq.set_used_event(4);
    assert_eq!(post_tx(&mut vq, &mem, 3, true), 1, "the first post kicks");
    let s = serve_tx(&mut q, &mem, Some(&mut p), 0, &stats).unwrap();
    assert_eq!(
        s,
        Served {
            used: 3,
            frames: 3,
            blocked: false,
            interrupt: false
        },
        "entries 0..3 used: not yet what the driver asked to hear of"
    );
    assert_eq!(vq.avail_event(), 3, "a kick asked for at the next chain");
    // While the worker sleeps, the next post kicks, and only the first of a burst.
    assert_eq!(post_tx(&mut vq, &mem, 3, true), 1);
    let s = serve_tx(&mut q, &mem, Some(&mut p), 0, &stats).unwrap();
    assert_eq!((s.used, s.interrupt), (3, true), "entry 4 used: interrupt");
    assert_eq!(vq.avail_event(), 6);
    assert_eq!(vq.used_idx(), 6);
    let mut n = 0;
    while let Some(r) = c.peek().unwrap() {
        c.pop(r).unwrap();
        n += 1;
    }
    assert_eq!(n, 6);

    // With the link down the chains are returned, and the next kick is still asked for (or
    // the guest would never kick again and its TX queue would fill).
    assert_eq!(post_tx(&mut vq, &mem, 2, true), 1);
    let s = serve_tx(&mut q, &mem, None, 0, &stats).unwrap();
    assert_eq!(s.used, 2);
    assert_eq!(vq.avail_event(), 8);
    assert_eq!(post_tx(&mut vq, &mem, 1, true), 1);
    assert_eq!(get(&stats.tx_link_down), 2);
}

#[test]
fn tx_without_event_idx_turns_kicks_off_while_it_works_and_on_when_it_sleeps() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut ring = NetRing::new();
    let (mut p, _c) = ring.ends(Side::Tx);
    let mut vq = Vq::new(&mem, TXQ);
    let mut q = vq.queue(false);
    assert_eq!(post_tx(&mut vq, &mem, 2, false), 2);
    let s = serve_tx(&mut q, &mem, Some(&mut p), 0, &stats).unwrap();
    assert_eq!((s.used, s.interrupt), (2, true));
    assert_eq!(
        vq.used_flags() & VRING_USED_F_NO_NOTIFY,
        0,
        "asleep: kicks on"
    );
}

#[test]
fn rx_refills_do_not_kick_until_a_frame_waits_for_a_buffer_then_the_next_one_does() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut ring = NetRing::new();
    let (mut p, mut c) = ring.ends(Side::Rx);
    let mut vq = Vq::new(&mem, RXQ);
    let mut q = vq.queue(true);
    let mut bufs = RxBuffers::default();
    vq.set_used_event(0);
    assert_eq!(
        post_rx(&mut vq, 2, true),
        1,
        "the driver's first fill kicks"
    );
    push_rx(&mut p);
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!(
        (s.used, s.frames, s.blocked, s.interrupt),
        (1, 1, false, true)
    );
    // The driver's NAPI poll takes the frame and refills: no kick, the device has buffers.
    vq.set_used_event(1);
    assert_eq!(
        post_rx(&mut vq, 1, true),
        0,
        "a refill while buffers are left"
    );
    for _ in 0..3 {
        push_rx(&mut p);
    }
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!(
        (s.used, s.frames, s.blocked),
        (2, 2, true),
        "the third frame waits"
    );
    assert_eq!(vq.used_idx(), 3);
    // Out of buffers: the next refill wakes the device, which then delivers the frame.
    assert_eq!(post_rx(&mut vq, 1, true), 1, "a refill while a frame waits");
    vq.set_used_event(3);
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!(
        (s.used, s.frames, s.blocked, s.interrupt),
        (1, 1, false, true)
    );
    assert_eq!(get(&stats.rx_frames), 4);
    assert_eq!(
        post_rx(&mut vq, 4, true),
        0,
        "buffers to spare again: no kicks"
    );
}

#[test]
fn rx_without_event_idx_turns_refill_kicks_off_until_a_frame_waits() {
    let mem = common::memory();
    let stats = NetStats::default();
    let mut ring = NetRing::new();
    let (mut p, mut c) = ring.ends(Side::Rx);
    let mut vq = Vq::new(&mem, RXQ);
    let mut q = vq.queue(false);
    let mut bufs = RxBuffers::default();
    post_rx(&mut vq, 2, false);
    push_rx(&mut p);
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!((s.frames, s.blocked), (1, false));
    assert_eq!(
        post_rx(&mut vq, 1, false),
        0,
        "a refill while buffers are left"
    );
    for _ in 0..3 {
        push_rx(&mut p);
    }
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!((s.frames, s.blocked), (2, true));
    assert_eq!(
        post_rx(&mut vq, 1, false),
        1,
        "a refill while a frame waits"
    );
    let s = serve_rx(&mut q, &mem, &mut c, &mut bufs, MRG, &stats).unwrap();
    assert_eq!((s.frames, s.blocked), (1, false));
}

/// Runs `f` on a thread; fails if it has not returned within a generous hang guard.
fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} did not return: the pass spins"))
}

#[test]
fn a_driver_publishing_an_impossible_available_index_ends_the_pass() {
    for event_idx in [true, false] {
        let (tx_served, rx_served) = returns("a pass over a lying queue", move || {
            let mem = common::memory();
            let stats = NetStats::default();
            let mut ring = NetRing::new();
            let (mut tp, _) = ring.ends(Side::Tx);
            let (mut rp, mut rc) = ring.ends(Side::Rx);
            let mut txq = Vq::new(&mem, TXQ);
            let mut rxq = Vq::new(&mem, RXQ);
            let mut t = txq.queue(event_idx);
            let mut r = rxq.queue(event_idx);
            post_tx(&mut txq, &mem, 1, event_idx);
            post_rx(&mut rxq, 1, event_idx);
            push_rx(&mut rp);
            push_rx(&mut rp);
            // 200 entries ahead of a 16-entry queue: virtio-queue yields nothing.
            let s1 = serve_tx(&mut t, &mem, Some(&mut tp), 0, &stats).unwrap();
            let s2 = serve_rx(
                &mut r,
                &mem,
                &mut rc,
                &mut RxBuffers::default(),
                MRG,
                &stats,
            )
            .unwrap();
            assert_eq!((s1.used, s2.frames), (1, 1));
            txq.set_avail_idx(txq.avail_idx().wrapping_add(200));
            rxq.set_avail_idx(rxq.avail_idx().wrapping_add(200));
            let s1 = serve_tx(&mut t, &mem, Some(&mut tp), 0, &stats).unwrap();
            let s2 = serve_rx(
                &mut r,
                &mem,
                &mut rc,
                &mut RxBuffers::default(),
                MRG,
                &stats,
            )
            .unwrap();
            (s1, s2)
        });
        assert_eq!(tx_served.used, 0, "event_idx {event_idx}");
        assert_eq!((rx_served.used, rx_served.blocked), (0, true));
    }
}
