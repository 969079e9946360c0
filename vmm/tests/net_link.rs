//! virtio-net's backend link against a REAL hub (`bulkhead_ipc::hub::Hub` on a thread, with
//! policy files and an audit log, as the `bulkhead-hub` binary builds it). The app VM is a
//! `Net` device whose VMM reaches the hub through its virtio_wl device's VM channel; its
//! guest is virtio-queue's mock driver on real guest memory. The net VM is this test
//! speaking the hub protocol and the ring as bulkhead-netd does (provide `net`, take the
//! connection, map the ring memfd from the hello). Checked: the link comes up at start,
//! frames cross both rings with doorbells, the link goes down when the net VM's connection
//! closes and comes back when the VMM reconnects, a net VM that breaks the ring costs only
//! the link, and a VM without the grant never gets a link while the audit log names why.

mod common;
use common::hub::TestHub;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
use bulkhead_ipc::hub::protocol::{HubEvent, Name, VmRequest};
use bulkhead_netring::{attach, features, Consumer, Hello, Mapping, Producer, Side, KICK};
use bulkhead_policy::{FdType, Rights};
use bulkhead_vmm::devices::virtio::net::device::{Net, FEATURES};
use bulkhead_vmm::devices::virtio::net::header::{VnetHdr, HDR_LEN};
use bulkhead_vmm::devices::virtio::net::hub::WlHub;
use bulkhead_vmm::devices::virtio::net::stats::get;
use bulkhead_vmm::devices::virtio::net::{RX_QUEUE, TX_QUEUE};
use bulkhead_vmm::devices::virtio::wl::device::Wl;
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm::devices::virtio::{Activation, ActiveQueue, VirtioDevice, VirtioInterrupt};
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const POLICY: &str = "version 1
grant netvm provide net c2s=memfd:rw max-fds=1
grant app connect net@netvm
grant @any quota shm=8MiB shm-count=8 vfds=16
";
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const RXQ: u64 = 0x1_0000;
const TXQ: u64 = 0x2_0000;
const RXBUF: u64 = 0x10_0000;
const TXBUF: u64 = 0x20_0000;
const HANG_GUARD: Duration = Duration::from_secs(30);

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + HANG_GUARD;
    while !f() {
        assert!(Instant::now() < end, "waited too long for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Records interrupts.
#[derive(Default)]
struct Irq {
    queue: [AtomicU32; 2],
    config: AtomicU32,
}

impl VirtioInterrupt for Irq {
    fn notify_queue(&self, index: usize) {
        self.queue[index].fetch_add(1, Ordering::SeqCst);
    }
    fn notify_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

/// The app VM: a Net device over its own VMM's hub channel, and its mock guest driver.
struct App {
    net: Net,
    _wl: Wl,
}

impl App {
    fn new(chan: Channel) -> App {
        let wl = Wl::new(WlSockets::new(), None, WlLimits::default()).unwrap();
        let mut wl = wl;
        wl.set_hub(HubLink::new(chan.into_fd(), WlSockets::new()).unwrap());
        let mut net = Net::new(MAC, "net@netvm").unwrap();
        net.start_link(Box::new(WlHub(wl.state().clone()))).unwrap();
        App { net, _wl: wl }
    }
    fn up(&self) -> bool {
        let mut s = [0u8; 2];
        self.net.read_config(6, &mut s);
        u16::from_le_bytes(s) & 1 == 1
    }
}

struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    irq: Arc<Irq>,
    next_rx: u16,
    next_tx: u16,
}

impl<'a> Guest<'a> {
    fn activate(mem: &'a GuestMemoryMmap, net: &mut Net) -> Guest<'a> {
        let rx = MockSplitQueue::create(mem, GuestAddress(RXQ), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(TXQ), 256);
        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let tx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Irq::default());
        net.activate(Activation {
            mem: mem.clone(),
            features: FEATURES,
            queues: vec![
                ActiveQueue {
                    index: RX_QUEUE,
                    queue: rx.create_queue().unwrap(),
                    notify: rx_kick.try_clone().unwrap(),
                },
                ActiveQueue {
                    index: TX_QUEUE,
                    queue: tx.create_queue().unwrap(),
                    notify: tx_kick.try_clone().unwrap(),
                },
            ],
            interrupt: irq.clone(),
        })
        .unwrap();
        Guest {
            mem,
            rx,
            tx,
            rx_kick,
            tx_kick,
            irq,
            next_rx: 0,
            next_tx: 0,
        }
    }
    fn post_rx(&mut self, n: u16) {
        for _ in 0..n {
            let i = self.next_rx;
            let addr = RXBUF + u64::from(i % 256) * 0x1000;
            self.rx
                .add_desc_chains(&common::chain(i % 256, &[(addr, 4096, true)]), i % 256)
                .unwrap();
            self.next_rx += 1;
        }
        self.rx_kick.write(1).unwrap();
    }
    fn send(&mut self, payload: &[u8]) {
        let i = self.next_tx % 256;
        let addr = TXBUF + u64::from(i) * 0x1000;
        let mut b = VnetHdr::default().encode().to_vec();
        b.extend_from_slice(payload);
        self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
        self.tx
            .add_desc_chains(&common::chain(i, &[(addr, b.len() as u32, false)]), i)
            .unwrap();
        self.next_tx += 1;
        self.tx_kick.write(1).unwrap();
    }
    fn rx_used(&self) -> u16 {
        self.rx.used().idx().load()
    }
    /// The frame in used RX buffer `i` (without its header).
    fn received(&self, i: usize) -> Vec<u8> {
        let e = self.rx.used().ring().ref_at(i).unwrap().load();
        let addr = RXBUF + u64::from(e.id()) * 0x1000;
        let mut b = vec![0u8; e.len() as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        let hdr = VnetHdr::decode(b[..HDR_LEN].try_into().unwrap());
        assert_eq!(hdr.num_buffers, 1);
        b[HDR_LEN..].to_vec()
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed).collect();
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&MAC);
    f
}

/// The net VM's side, as bulkhead-netd does it.
struct NetVm {
    chan: Channel,
}

struct Client {
    conn: HubConn,
    map: Mapping,
    tx: Consumer,
    rx: Producer,
}

impl NetVm {
    fn provide(chan: Channel) -> NetVm {
        chan.send(
            &VmRequest::Provide {
                tag: 1,
                service: Name::try_from("net").unwrap(),
            },
            &[],
        )
        .unwrap();
        let (ev, _) = chan.recv::<HubEvent>().unwrap();
        assert!(matches!(ev, HubEvent::Provided { tag: 1 }), "{ev:?}");
        chan.set_nonblocking(true).unwrap();
        NetVm { chan }
    }

    /// Waits for the next connection and its hello.
    fn accept(&self) -> Client {
        let mut accepted = None;
        until("a connection to net", || {
            match self.chan.try_recv::<HubEvent>() {
                Ok((HubEvent::Accept { .. }, mut fds)) => {
                    accepted = fds.pop();
                    true
                }
                Ok(_) => false,
                Err(ChannelError::WouldBlock) => false,
                Err(e) => panic!("{e}"),
            }
        });
        let mut conn = HubConn::from_fd(accepted.unwrap()).unwrap();
        let (data, mut fds) = message(&mut conn);
        let hello = Hello::decode(&data).unwrap();
        assert_eq!(fds.len(), 1);
        let (fd, info): (OwnedFd, _) = fds.pop().unwrap();
        assert_eq!(info.fd_type, FdType::Memfd);
        assert!(info
            .rights
            .contains(Rights::READ.union(Rights::WRITE).union(Rights::MAP)));
        let map = Mapping::map(fd.as_fd(), hello.ring_len as usize).unwrap();
        let ring = attach(map.mem()).unwrap();
        assert_eq!(ring.mac, MAC);
        Client {
            tx: Consumer::new(map.mem(), &ring, Side::Tx),
            rx: Producer::new(map.mem(), &ring, Side::Rx),
            conn,
            map,
        }
    }
}

fn message(c: &mut HubConn) -> (Vec<u8>, Vec<(OwnedFd, bulkhead_ipc::hub::protocol::FdInfo)>) {
    let mut out = None;
    until("a message", || match c.try_recv() {
        Ok(Incoming::Message { data, fds }) => {
            out = Some((data, fds));
            true
        }
        Ok(_) => false,
        Err(ClientError::Channel(ChannelError::WouldBlock)) => false,
        Err(e) => panic!("{e}"),
    });
    out.unwrap()
}

impl Client {
    /// Waits for TX frames (sleeping between doorbells, as netd does).
    fn frames(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        until("TX frames", || {
            while let Some(r) = self.tx.peek().unwrap() {
                out.push(r.to_vec());
                self.tx.pop(r).unwrap();
            }
            if out.len() >= n {
                return true;
            }
            if self.tx.prepare_sleep().unwrap() {
                // Asleep: a doorbell must come.
                let (data, fds) = message(&mut self.conn);
                assert_eq!((data.as_slice(), fds.len()), (KICK, 0));
            }
            false
        });
        out
    }
    fn push(&mut self, f: &[u8]) {
        let rec = [VnetHdr::default().encode().to_vec(), f.to_vec()].concat();
        assert!(self.rx.push(&rec).unwrap());
        if self.rx.kick_needed().unwrap() {
            self.conn.try_send(KICK, &[]).unwrap();
        }
    }
}

#[test]
fn frames_cross_both_rings_and_the_link_follows_the_net_vms_connection() {
    let mem = common::memory();
    let (hub, mut chans) = TestHub::start(POLICY, &["netvm", "app"], 64);
    let app_chan = chans.pop().unwrap();
    let netvm = NetVm::provide(chans.pop().unwrap());
    let mut app = App::new(app_chan);
    let mut c = netvm.accept();
    until("link up", || app.up());
    assert_eq!(get(&app.net.shared().stats.link_ups), 1);
    assert_eq!(features(c.map.mem()).unwrap(), 0, "no guest driver yet");

    let mut g = Guest::activate(&mem, &mut app.net);
    assert_eq!(
        features(c.map.mem()).unwrap(),
        FEATURES,
        "the offloads the guest took"
    );
    // Guest → net VM.
    let f1 = frame(100, 1);
    g.send(&f1);
    let got = c.frames(1);
    assert_eq!(got[0][HDR_LEN..], f1[..]);
    // Net VM → guest.
    g.post_rx(8);
    let f2 = frame(1400, 2);
    c.push(&f2);
    until("a received frame", || g.rx_used() == 1);
    assert_eq!(g.received(0), f2);
    assert!(g.irq.queue[RX_QUEUE].load(Ordering::SeqCst) >= 1);
    // A burst both ways.
    for i in 0..40u8 {
        g.send(&frame(60 + usize::from(i), i));
    }
    let got = c.frames(40);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f[HDR_LEN..], frame(60 + i, i as u8)[..]);
    }
    g.post_rx(60);
    for i in 0..50u8 {
        c.push(&frame(200, i));
    }
    until("50 more frames", || g.rx_used() == 51);
    for i in 0..50u8 {
        assert_eq!(g.received(1 + usize::from(i)), frame(200, i));
    }

    // The net VM closes the connection: the link goes down, the guest hears of it.
    let config_before = g.irq.config.load(Ordering::SeqCst);
    drop(c);
    until("link down", || !app.up());
    until("a config interrupt", || {
        g.irq.config.load(Ordering::SeqCst) > config_before
    });
    // Frames sent meanwhile are returned and counted, not kept.
    g.send(&frame(80, 9));
    // The VMM connects again; the link comes back with a fresh ring.
    let mut c = netvm.accept();
    until("link up again", || app.up());
    assert!(get(&app.net.shared().stats.link_downs) >= 1);
    let f3 = frame(300, 3);
    g.send(&f3);
    let got = c.frames(1);
    assert_eq!(got.last().unwrap()[HDR_LEN..], f3[..]);
    c.push(&frame(90, 4));
    until("a frame on the new ring", || g.rx_used() == 52);
    assert_eq!(g.received(51), frame(90, 4));

    drop(c);
    drop(app);
    drop(netvm);
    hub.join();
}

#[test]
fn a_net_vm_that_breaks_the_ring_costs_the_link_not_the_vmm() {
    let mem = common::memory();
    let (hub, mut chans) = TestHub::start(POLICY, &["netvm", "app"], 64);
    let app_chan = chans.pop().unwrap();
    let netvm = NetVm::provide(chans.pop().unwrap());
    let mut app = App::new(app_chan);
    let mut c = netvm.accept();
    until("link up", || app.up());
    let mut g = Guest::activate(&mem, &mut app.net);
    g.post_rx(4);
    // A producer position past the ring's end, then a doorbell.
    let mem_ring = c.map.mem();
    mem_ring
        .atomic_u32(0xc0)
        .unwrap()
        .store(0x7fff_fff8, Ordering::SeqCst);
    c.conn.try_send(KICK, &[]).unwrap();
    until("link down", || !app.up());
    // A new connection, a working ring.
    let mut c2 = netvm.accept();
    until("link up again", || app.up());
    c2.push(&frame(100, 7));
    until("a frame", || g.rx_used() == 1);
    assert_eq!(g.received(0), frame(100, 7));
    drop(c);
    drop(c2);
    drop(app);
    drop(netvm);
    hub.join();
}

#[test]
fn a_vm_without_the_grant_gets_no_link_and_the_audit_log_names_the_missing_grant() {
    let (hub, mut chans) = TestHub::start(POLICY, &["netvm", "stranger"], 64);
    let stranger = chans.pop().unwrap();
    let netvm = NetVm::provide(chans.pop().unwrap());
    let app = App::new(stranger);
    until("the refusal in the audit log", || {
        hub.audit().lines().any(|l| {
            l.contains("\"src\":\"stranger\"")
                && l.contains("\"verb\":\"connect\"")
                && l.contains("\"obj\":\"net@netvm\"")
                && l.contains("\"allowed\":false")
                && l.contains("NoGrant: no connect grant matches")
        })
    });
    // It keeps trying (no busy loop: a growing pause) and never gets a link.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!app.up());
    assert_eq!(get(&app.net.shared().stats.link_ups), 0);
    assert!(
        netvm.chan.try_recv::<HubEvent>().is_err(),
        "no Accept reached the net VM"
    );
    drop(app);
    drop(netvm);
    hub.join();
}
