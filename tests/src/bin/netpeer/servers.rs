//! What the peer serves and watches, each on a thread of its own, recording into
//! [`Events`]: a tiny HTTP server (one page), a watcher of ICMP echo requests, a counter of
//! every frame its NIC receives by source MAC (per second), and the measurement server of
//! the benchmark (RTT by TCP ping-pong, then throughput of a stream), one client at a time.
//! Everything is measured here, on the emulated host, not in a guest.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A MAC address.
pub type Mac = [u8; 6];

pub fn mac_text(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(s: &str) -> Result<Mac, String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("bad MAC {s:?}"))?;
    parts.try_into().map_err(|_| format!("bad MAC {s:?}"))
}

/// One page served.
#[derive(Debug, Clone)]
pub struct Served {
    pub at: Duration,
    pub from: Ipv4Addr,
}

/// One benchmark measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    pub label: String,
    pub from: Ipv4Addr,
    pub rtt_us_median: f64,
    pub rtt_us_p90: f64,
    pub mbit_s: f64,
    pub bytes: u64,
    pub seconds: f64,
}

/// Everything the servers saw.
#[derive(Debug, Default)]
pub struct Events {
    pub served: Vec<Served>,
    /// ICMP echo requests by source.
    pub echoes: BTreeMap<Ipv4Addr, u64>,
    /// Frames received by source MAC: total, and per second since the start.
    pub frames: BTreeMap<Mac, (u64, Vec<u64>)>,
    pub measured: Vec<Measured>,
}

impl Events {
    /// Frames from `mac` in second `s` since the start.
    pub fn frames_in_second(&self, mac: &Mac, s: usize) -> u64 {
        self.frames
            .get(mac)
            .and_then(|(_, per)| per.get(s).copied())
            .unwrap_or(0)
    }
}

#[derive(Clone)]
pub struct Shared {
    pub start: Instant,
    pub events: Arc<Mutex<Events>>,
    pub page: Arc<String>,
    /// What `/flood` answers: `stop` once set, `more` before (the flooding guest asks
    /// between rounds).
    pub stop_flood: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(page: String) -> Self {
        Shared {
            start: Instant::now(),
            events: Arc::new(Mutex::new(Events::default())),
            page: Arc::new(page),
            stop_flood: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn peer_v4(s: &TcpStream) -> Ipv4Addr {
    match s.peer_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

/// HTTP/1.0: `GET /flood` answered `stop` or `more`, any other `GET` with the page,
/// anything else with 400.
pub fn http(listener: TcpListener, shared: Shared) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let from = peer_v4(&s);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 4096 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req);
            let path = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("GET "))
                .and_then(|l| l.split_whitespace().next())
                .map(str::to_string);
            let Some(path) = path else {
                let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                println!("refused a request from {from}");
                return;
            };
            let body = if path == "/flood" {
                if shared.stop_flood.load(Ordering::SeqCst) {
                    "stop\n".to_string()
                } else {
                    "more\n".to_string()
                }
            } else {
                format!("{}\n", shared.page)
            };
            let answer = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(answer.as_bytes()).is_ok() {
                let at = shared.start.elapsed();
                println!(
                    "served GET {path} to {from} at {:.1} s ({} bytes)",
                    at.as_secs_f64(),
                    body.len()
                );
                shared.lock().served.push(Served { at, from });
            }
        });
    }
}

/// Counts ICMP echo requests by source (a raw ICMP socket gets a copy of each).
pub fn icmp(sock: OwnedFd, shared: Shared) {
    let mut buf = [0u8; 2048];
    loop {
        let n = match nix::unistd::read(&sock, &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                println!("icmp watch: {e}");
                return;
            }
        };
        let pkt = &buf[..n];
        if pkt.len() < 20 {
            continue;
        }
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        if pkt.len() < ihl + 8 || pkt[ihl] != 8 {
            continue;
        }
        let from = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let seq = u16::from_be_bytes([pkt[ihl + 6], pkt[ihl + 7]]);
        println!("echo request from {from} (seq {seq})");
        *shared.lock().echoes.entry(from).or_default() += 1;
    }
}

/// Counts every frame the NIC receives by source MAC, per second.
pub fn frames(sock: OwnedFd, own: Mac, shared: Shared) {
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match nix::unistd::read(&sock, &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                println!("frame counter: {e}");
                return;
            }
        };
        if n < 14 {
            continue;
        }
        let mut src: Mac = [0; 6];
        src.copy_from_slice(&buf[6..12]);
        if src == own || src == [0; 6] {
            continue;
        }
        let sec = shared.start.elapsed().as_secs() as usize;
        let mut ev = shared.lock();
        let (total, per) = ev.frames.entry(src).or_default();
        *total += 1;
        if per.len() <= sec {
            per.resize(sec + 1, 0);
        }
        per[sec] += 1;
    }
}

/// Prints, once a second, the sources that sent at least `flood_rate` frames in the last
/// whole second.
pub fn rates(shared: Shared, flood_rate: u64) {
    let mut last = 0usize;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = shared.start.elapsed().as_secs() as usize;
        if now == last {
            continue;
        }
        let ev = shared.lock();
        for s in last..now {
            for (mac, (_, per)) in &ev.frames {
                let n = per.get(s).copied().unwrap_or(0);
                if n >= flood_rate {
                    println!("flood: {n} frames from {} in second {s}", mac_text(mac));
                }
            }
        }
        last = now;
    }
}

/// Rounds of the TCP ping-pong.
pub const RTT_ROUNDS: usize = 200;

/// One measurement: the client sends its label and a newline; once every label before it
/// in `order` has been measured (each client waits its turn, connected), we send one byte
/// `1` and wait for its echo, [`RTT_ROUNDS`] times; then one byte `0`, after which the
/// client streams until it shuts its side down, and we count the bytes and the time from
/// the first to the last. One measurement at a time.
fn measure_one(mut s: TcpStream, shared: &Shared, order: &[String]) -> Result<Measured, String> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let from = peer_v4(&s);
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut label = Vec::new();
    let mut b = [0u8; 1];
    while label.len() < 64 {
        s.read_exact(&mut b).map_err(|e| format!("label: {e}"))?;
        if b[0] == b'\n' {
            break;
        }
        label.push(b[0]);
    }
    let label = String::from_utf8_lossy(&label).into_owned();
    let before: Vec<&String> = order.iter().take_while(|l| **l != label).collect();
    let deadline = Instant::now() + Duration::from_secs(900);
    while !before
        .iter()
        .all(|l| shared.lock().measured.iter().any(|m| &m.label == *l))
    {
        if Instant::now() > deadline {
            return Err(format!("{label}: the measurements before it never came"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rtts = Vec::with_capacity(RTT_ROUNDS);
    for _ in 0..RTT_ROUNDS {
        let t = Instant::now();
        s.write_all(&[1]).map_err(|e| format!("ping: {e}"))?;
        s.read_exact(&mut b).map_err(|e| format!("pong: {e}"))?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    s.write_all(&[0]).map_err(|e| format!("go: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut bytes = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                last = Instant::now();
                first.get_or_insert(last);
                bytes += n as u64;
            }
            Err(e) => return Err(format!("stream: {e}")),
        }
    }
    let seconds = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    let m = Measured {
        label,
        from,
        rtt_us_median: rtts[rtts.len() / 2],
        rtt_us_p90: rtts[rtts.len() * 9 / 10],
        mbit_s: if seconds > 0.0 {
            bytes as f64 * 8.0 / seconds / 1e6
        } else {
            0.0
        },
        bytes,
        seconds,
    };
    println!(
        "measured {} from {}: rtt_us_median={:.0} rtt_us_p90={:.0} tcp_mbit_s={:.2} bytes={} seconds={:.2}",
        m.label, m.from, m.rtt_us_median, m.rtt_us_p90, m.mbit_s, m.bytes, m.seconds
    );
    Ok(m)
}

/// The benchmark's measurement server: each client on a thread, measured in `order` (labels
/// not in it after those), one at a time.
pub fn measure(listener: TcpListener, shared: Shared, order: Vec<String>) {
    let order = Arc::new(order);
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        let (shared, order) = (shared.clone(), order.clone());
        std::thread::spawn(move || match measure_one(s, &shared, &order) {
            Ok(m) => shared.lock().measured.push(m),
            Err(e) => println!("a measurement failed: {e}"),
        });
    }
}

/// A raw socket of `domain` and `protocol` (ICMP copies, every frame).
pub fn raw_socket(domain: i32, protocol: i32) -> Result<OwnedFd, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
