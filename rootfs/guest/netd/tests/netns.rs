//! bulkhead-netd on the build machine, for real: the binary runs in network and mount
//! namespaces of its own (`unshare`) with a veth pair as its NIC, whose other end is a peer
//! in a second namespace (198.51.100.1, TEST-NET-2: nothing leaves this machine's private
//! namespaces). This test plays two app VMs' VMMs over netd's Unix-socket transport (the
//! same hello, ring memfd and doorbells the virtio_wl transport carries): ARP and ping
//! through the bridge to the peer and back, a frame with another VM's source address
//! dropped, a header the kernel refuses dropped without harm, app VMs isolated from each
//! other's broadcasts, and a client that leaves.
//!
//! Needs root and /dev/net/tun (CI and the build machine have both).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bulkhead_netd::transport::{Conn, Recv, UnixConn};
use bulkhead_netring::{
    create, ring_len, set_features, Consumer, Hello, Mapping, Producer, Side, DEFAULT_DATA_SIZE,
};

const PEER_IP: [u8; 4] = [198, 51, 100, 1];
const HDR: usize = 12;

struct Netd {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
}

impl Netd {
    fn start() -> Netd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("net.sock");
        let script = format!(
            "set -e
             mount -t sysfs sysfs /sys
             mkdir -p /run/netns && mount -t tmpfs tmpfs /run/netns
             ip netns add peer
             ip link add vup type veth peer name vpeer netns peer
             ip -n peer link set lo up
             ip -n peer addr add 198.51.100.1/24 dev vpeer
             ip -n peer link set vpeer up
             exec {} --listen-unix {} --uplink vup --bridge br0 --address 198.51.100.2/24",
            env!("CARGO_BIN_EXE_bulkhead-netd"),
            sock.display()
        );
        let mut child = Command::new("unshare")
            .args(["--mount", "--net", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare (util-linux) runs netd in its own namespaces");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("{l}");
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut n = Netd {
            child,
            lines,
            seen: Vec::new(),
            _dir: dir,
            sock,
        };
        n.expect("netd: providing net");
        n
    }

    fn expect(&mut self, needle: &str) -> String {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.starts_with(needle)) {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(e) => panic!("no {needle:?} from netd ({e}); saw {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Netd {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// An app VM's VMM: the ring memfd, the connection, frames in and out.
struct App {
    mac: [u8; 6],
    ip: [u8; 4],
    conn: UnixConn,
    _map: Mapping,
    tx: Producer,
    rx: Consumer,
    /// Every frame received so far.
    seen: Vec<Vec<u8>>,
}

impl App {
    fn connect(netd: &Netd, last: u8) -> App {
        let mac = [0x52, 0x54, 0, 0, 0, last];
        // SAFETY: a static name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ring".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = ring_len(DEFAULT_DATA_SIZE);
        std::fs::File::from(memfd.try_clone().unwrap())
            .set_len(len as u64)
            .unwrap();
        let map = Mapping::map(memfd.as_fd(), len).unwrap();
        let info = create(map.mem(), DEFAULT_DATA_SIZE, mac).unwrap();
        set_features(map.mem(), 1 << 15).unwrap(); // MRG_RXBUF only: no offloads
                                                   // SAFETY: plain socket(2).
        let s =
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
        assert!(s >= 0);
        // SAFETY: a new fd.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let addr = nix::sys::socket::UnixAddr::new(&netd.sock).unwrap();
        nix::sys::socket::connect(s.as_raw_fd(), &addr).unwrap();
        let hello = Hello {
            ring_len: len as u64,
        }
        .encode();
        let fds = [memfd.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            s.as_raw_fd(),
            &[std::io::IoSlice::new(&hello)],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let fl = nix::fcntl::fcntl(&s, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        nix::fcntl::fcntl(
            &s,
            nix::fcntl::FcntlArg::F_SETFL(
                nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK,
            ),
        )
        .unwrap();
        App {
            mac,
            ip: [198, 51, 100, 10 + last],
            conn: UnixConn::new(s),
            tx: Producer::new(map.mem(), &info, Side::Tx),
            rx: Consumer::new(map.mem(), &info, Side::Rx),
            _map: map,
            seen: Vec::new(),
        }
    }

    fn send_raw(&mut self, hdr: [u8; HDR], frame: &[u8]) {
        let rec = [hdr.to_vec(), frame.to_vec()].concat();
        assert!(self.tx.push(&rec).unwrap());
        if self.tx.kick_needed().unwrap() {
            assert!(self.conn.kick().unwrap());
        }
    }

    fn send(&mut self, frame: &[u8]) {
        self.send_raw([0; HDR], frame);
    }

    /// Sends `frame` every half second until a received frame matches `pred`, as a
    /// network stack retries ARP (a port's first frames may be lost while links settle).
    fn ask(&mut self, frame: &[u8], what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        for _ in 0..40 {
            self.send(frame);
            if let Some(f) = self.wait_within(Duration::from_millis(500), &pred) {
                return f;
            }
        }
        panic!("no {what}");
    }

    fn wait_within(&mut self, t: Duration, pred: &impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let end = Instant::now() + t;
        loop {
            while let Some(r) = self.rx.peek().unwrap() {
                let rec = r.to_vec();
                self.rx.pop(r).unwrap();
                self.seen.push(rec[HDR..].to_vec());
                if pred(&rec[HDR..]) {
                    return Some(rec[HDR..].to_vec());
                }
            }
            if self.rx.space_kick_needed().unwrap() {
                self.conn.kick().unwrap();
            }
            if self.rx.prepare_sleep().unwrap() {
                if Instant::now() >= end {
                    return None;
                }
                let mut p = libc::pollfd {
                    fd: self.conn.poll_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                unsafe { libc::poll(&mut p, 1, 50) };
                while let Recv::Message(..) = self.conn.recv().unwrap() {}
            }
        }
    }

    /// Frames received until `pred` matches one (hang guard 20 s); returns it.
    fn wait_for(&mut self, what: &str, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(r) = self.rx.peek().unwrap() {
                let rec = r.to_vec();
                self.rx.pop(r).unwrap();
                eprintln!("rx {:02x?}", &rec[..rec.len().min(50)]);
                if pred(&rec[HDR..]) {
                    return rec[HDR..].to_vec();
                }
            }
            if self.rx.space_kick_needed().unwrap() {
                self.conn.kick().unwrap();
            }
            if self.rx.prepare_sleep().unwrap() {
                assert!(Instant::now() < end, "no {what}");
                let mut p = libc::pollfd {
                    fd: self.conn.poll_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                while let Recv::Message(..) = self.conn.recv().unwrap() {}
            }
        }
    }

    /// Everything received so far.
    fn drain(&mut self) -> Vec<Vec<u8>> {
        while let Some(r) = self.rx.peek().unwrap() {
            self.seen.push(r.to_vec()[HDR..].to_vec());
            self.rx.pop(r).unwrap();
        }
        self.seen.clone()
    }

    fn arp_request(&self, target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&self.mac);
        f.extend_from_slice(&self.ip);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f.resize(60, 0);
        f
    }

    fn ping(&self, dst_mac: [u8; 6], src_mac: [u8; 6], id: u16) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut icmp = vec![8, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&1u16.to_be_bytes());
        icmp.extend_from_slice(b"bulkhead ping payload");
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
        ip.extend_from_slice(&self.ip);
        ip.extend_from_slice(&PEER_IP);
        let total = (ip.len() + icmp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&icmp);
        f
    }
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn is_arp_reply_from_peer(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[28..32] == PEER_IP
}

fn is_echo_reply(f: &[u8], id: u16) -> bool {
    f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[26..30] == PEER_IP
        && f[34] == 0
        && f[38..40] == id.to_be_bytes()
}

#[test]
fn app_vms_reach_the_peer_through_the_bridge_and_not_each_other() {
    let mut netd = Netd::start();
    let mut a = App::connect(&netd, 10);
    netd.expect("netd: unix-1 (52:54:00:00:00:0a) joined: bhtap0 on br0");
    let mut b = App::connect(&netd, 11);
    netd.expect("netd: unix-2 (52:54:00:00:00:0b) joined: bhtap1 on br0");

    // ARP and ping through the bridge to the peer and back.
    let req = a.arp_request(PEER_IP);
    let reply = a.ask(&req, "an ARP reply from the peer", is_arp_reply_from_peer);
    let peer_mac: [u8; 6] = reply[22..28].try_into().unwrap();
    assert_eq!(&reply[..6], &a.mac, "addressed to A");
    let ping = a.ping(peer_mac, a.mac, 0x1234);
    a.send(&ping);
    a.wait_for("an echo reply", |f| is_echo_reply(f, 0x1234));

    // A frame with another VM's source address never leaves netd: no reply comes.
    let spoofed = a.ping(peer_mac, b.mac, 0x5555);
    a.send(&spoofed);
    // A header the kernel refuses (a GSO type without checksum offload): dropped too.
    let mut bad = [0u8; HDR];
    bad[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    bad[4] = 0xff;
    a.send_raw(bad, &a.ping(peer_mac, a.mac, 0x6666));
    // A broadcast with a marker type from A, then a ping that proves it was handled.
    let mut marker = vec![0xff; 6];
    marker.extend_from_slice(&a.mac);
    marker.extend_from_slice(&[0x88, 0xb5]);
    marker.extend_from_slice(b"from A to everyone");
    marker.resize(60, 0);
    a.send(&marker);
    a.send(&a.ping(peer_mac, a.mac, 0x7777));
    a.wait_for("the echo reply after the bad frames", |f| {
        is_echo_reply(f, 0x7777)
    });
    // B still works, and never saw A's broadcast (isolated ports).
    let req = b.arp_request(PEER_IP);
    b.ask(&req, "B's ARP reply", is_arp_reply_from_peer);
    b.send(&b.ping(peer_mac, b.mac, 0x2222));
    b.wait_for("B's echo reply", |f| is_echo_reply(f, 0x2222));
    let leaked = b
        .drain()
        .into_iter()
        .any(|f| f.len() > 14 && f[12..14] == [0x88, 0xb5]);
    assert!(!leaked, "B received A's broadcast");
    // A never got replies to the spoofed or refused pings.
    let got = a.drain();
    assert!(!got
        .iter()
        .any(|f| is_echo_reply(f, 0x5555) || is_echo_reply(f, 0x6666)));

    // A leaves: netd reports what it dropped and goes on serving B.
    drop(a);
    let bye = netd.expect("netd: unix-1 gone (hung up)");
    assert!(bye.contains("1 spoofed"), "{bye}");
    assert!(bye.contains("1 refused"), "{bye}");
    b.send(&b.ping(peer_mac, b.mac, 0x3333));
    b.wait_for("B's echo reply after A left", |f| is_echo_reply(f, 0x3333));
}

/// One app VM floods netd with frames it must drop or that go nowhere (another VM's source
/// address, headers the kernel refuses, runts, broadcasts of junk) while another app VM
/// pings the peer: every one of the other's pings is answered, and netd's counters show the
/// flood was seen and dropped.
#[test]
fn a_flood_of_malformed_frames_from_one_app_vm_does_not_stop_another() {
    let mut netd = Netd::start();
    let mut a = App::connect(&netd, 20);
    let mut b = App::connect(&netd, 21);
    netd.expect("netd: unix-2 (52:54:00:00:00:15) joined");
    let req = b.arp_request(PEER_IP);
    let reply = b.ask(&req, "B's ARP reply", is_arp_reply_from_peer);
    let peer_mac: [u8; 6] = reply[22..28].try_into().unwrap();

    // A's flood runs on its own thread, as fast as its ring takes it.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let flooder = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let spoofed = a.ping(peer_mac, b.mac, 0x0bad);
        let mut bad_hdr = [0u8; HDR];
        bad_hdr[1] = 0x42; // no such GSO type
        let mut junk = vec![0xffu8; 6];
        junk.extend_from_slice(&a.mac);
        junk.extend_from_slice(&[0x88, 0xb5]);
        junk.resize(1500, 0xa5);
        let runt = [0u8; 10];
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let frames: [(&[u8], [u8; HDR]); 4] = [
                    (&spoofed, [0; HDR]),
                    (&junk, bad_hdr),
                    (&runt, [0; HDR]),
                    (&junk, [0; HDR]),
                ];
                for (f, h) in frames {
                    let rec = [h.to_vec(), f.to_vec()].concat();
                    if a.tx.push(&rec).unwrap() {
                        sent.fetch_add(1, Ordering::SeqCst);
                    } else {
                        std::thread::yield_now();
                    }
                    if a.tx.kick_needed().unwrap() {
                        let _ = a.conn.kick();
                    }
                }
                while let Some(r) = a.rx.peek().unwrap() {
                    a.rx.pop(r).unwrap();
                }
                if a.rx.space_kick_needed().unwrap() {
                    let _ = a.conn.kick();
                }
            }
            a
        })
    };
    // B pings all along; every ping is answered.
    let end = Instant::now() + Duration::from_secs(60);
    let mut pings = 0u16;
    while pings < 30 || sent.load(Ordering::SeqCst) < 20_000 {
        assert!(
            Instant::now() < end,
            "the flood did not reach 20 000 frames in time"
        );
        let id = 0x4000 + pings;
        b.send(&b.ping(peer_mac, b.mac, id));
        b.wait_for("B's echo reply during the flood", |f| is_echo_reply(f, id));
        pings += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let a = flooder.join().unwrap();
    drop(a);
    // netd saw the flood and dropped what it had to.
    let bye = netd.expect("netd: unix-1 gone (hung up)");
    let count = |what: &str| -> u64 {
        bye.split([',', ';'])
            .map(str::trim)
            .find(|p| p.ends_with(what))
            .and_then(|p| p.split(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count(" spoofed") > 2_000 && count(" refused") > 2_000,
        "{bye}"
    );
    println!(
        "B: {pings} pings answered during a flood of {} frames",
        sent.load(Ordering::SeqCst)
    );
}
