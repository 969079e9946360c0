//! A guest-side tool of the net VM's tests and benchmark.
//!
//! - `measure PEER:PORT --label L`: the client of the test peer's measurement (the peer
//!   times everything): sends the label, echoes each `1` byte the peer sends, and after the
//!   `0` byte streams for `--seconds`, then shuts its side down.
//! - `fetch http://ADDR/PATH`: an HTTP/1.0 GET of the peer's page (no resolver: Debian's
//!   busybox wget crashed in our root filesystems, which have no NSS configuration).
//! - `carrier eth0 --timeout 30`: waits for the interface's carrier by the monotonic clock
//!   (not by a count of polls, whose cost depends on the machine's load) and says how long
//!   it waited; exits 1 without a carrier.
//! - `flood --iface eth0`: fault injection: sends malformed and hostile frames from an app
//!   VM as fast as its paced loop allows for `--seconds`: frames with forged source MACs
//!   (netd drops them), IPv4 frames with garbage headers, runt frames of a bare Ethernet
//!   header, and full-size frames of random bytes, to the broadcast address.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bulkhead-netprobe", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Be measured by the test peer (RTT, then a stream).
    Measure {
        /// The peer's measurement address, e.g. 198.51.100.1:9000.
        peer: String,
        /// What the peer calls this measurement.
        #[arg(long)]
        label: String,
        /// How long to stream.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// How long to keep trying to connect.
        #[arg(long, default_value_t = 300)]
        connect_for: u64,
    },
    /// Fetch `http://ADDR[:PORT]/PATH` (HTTP/1.0, an IP address, no resolver) and print the
    /// body; exits non-zero on any failure.
    Fetch {
        url: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Wait for an interface's carrier, up to `--timeout` seconds by the monotonic clock;
    /// prints how long it waited; exits 1 if none came.
    Carrier {
        iface: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Send malformed and hostile frames (fault injection).
    Flood {
        #[arg(long, default_value = "eth0")]
        iface: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Frames per burst; a 1 ms pause follows each.
        #[arg(long, default_value_t = 32)]
        burst: u32,
    },
}

fn measure(peer: &str, label: &str, seconds: u64, connect_for: u64) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(connect_for);
    let mut s = loop {
        match TcpStream::connect(peer) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(format!("{peer}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{label}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    let mut rounds = 0u32;
    loop {
        s.read_exact(&mut b).map_err(|e| format!("ping: {e}"))?;
        if b[0] == 0 {
            break;
        }
        s.write_all(&b).map_err(|e| format!("pong: {e}"))?;
        rounds += 1;
    }
    let chunk = vec![0x5au8; 64 * 1024];
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        s.write_all(&chunk).map_err(|e| format!("stream: {e}"))?;
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let _ = s.read(&mut b);
    Ok(format!(
        "measured as {label}: {rounds} round trips, {sent} bytes streamed"
    ))
}

fn fetch(url: &str, timeout: u64) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?;
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let addr: std::net::SocketAddr = if host.contains(':') {
        host.parse()
    } else {
        format!("{host}:80").parse()
    }
    .map_err(|e| format!("{host}: {e} (an IP address is needed)"))?;
    let t = Duration::from_secs(timeout.max(1));
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| format!("request: {e}"))?;
    let mut answer = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(|e| format!("answer: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("an answer without a header")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.trim_end().to_string())
}

fn own_mac(iface: &str) -> Result<[u8; 6], String> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .map_err(|e| format!("{iface}: {e}"))?;
    let v: Vec<u8> = text
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{iface}: bad address {text:?}"))?;
    v.try_into().map_err(|_| format!("{iface}: bad address"))
}

/// A small xorshift generator: the flood's bytes need not be good random numbers.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

const BROADCAST: [u8; 6] = [0xff; 6];
/// IEEE 802 "local experimental" EtherType.
const ETH_EXPERIMENTAL: u16 = 0x88b5;

/// The `n`th frame of the flood into `buf`; returns its length and whether its source is
/// forged.
fn flood_frame(n: u64, own: &[u8; 6], rng: &mut Xorshift, buf: &mut [u8; 1514]) -> (usize, bool) {
    buf[0..6].copy_from_slice(&BROADCAST);
    buf[6..12].copy_from_slice(own);
    match n % 4 {
        0 => {
            // A forged source: another locally administered unicast MAC.
            rng.fill(&mut buf[6..12]);
            buf[6] = (buf[6] | 0x02) & !0x01;
            buf[12..14].copy_from_slice(&ETH_EXPERIMENTAL.to_be_bytes());
            rng.fill(&mut buf[14..64]);
            (64, true)
        }
        1 => {
            // IPv4 with a garbage header (version, length and checksum all wrong).
            buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            rng.fill(&mut buf[14..74]);
            buf[14] = 0x0f;
            (74, false)
        }
        2 => {
            // A runt: the Ethernet header alone.
            buf[12..14].copy_from_slice(&ETH_EXPERIMENTAL.to_be_bytes());
            (14, false)
        }
        _ => {
            buf[12..14].copy_from_slice(&ETH_EXPERIMENTAL.to_be_bytes());
            rng.fill(&mut buf[14..1514]);
            (1514, false)
        }
    }
}

fn flood(iface: &str, seconds: u64, burst: u32) -> Result<String, String> {
    let own = own_mac(iface)?;
    let index: i32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .map_err(|e| format!("{iface}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{iface}'s index: {e}"))?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("AF_PACKET: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&BROADCAST);
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut buf = [0u8; 1514];
    let (mut sent, mut forged, mut refused) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..burst {
            let (len, is_forged) = flood_frame(n, &own, &mut rng, &mut buf);
            n += 1;
            // SAFETY: `buf[..len]` and `addr` are valid for the call; the kernel copies them.
            let r = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    buf.as_ptr().cast(),
                    len,
                    0,
                    std::ptr::addr_of!(addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r < 0 {
                refused += 1;
            } else {
                sent += 1;
                forged += u64::from(is_forged);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(format!(
        "sent {sent} frames ({forged} with forged sources) in {:.1} s, {refused} refused by the guest kernel",
        start.elapsed().as_secs_f64()
    ))
}

/// Prints its line on stdout either way (the scripts print nothing else about it).
fn carrier(iface: &str, timeout: u64) -> ExitCode {
    use bulkhead_netd::carrier::{read_carrier, wait_for_carrier, CarrierWait};
    let origin = Instant::now();
    let r = wait_for_carrier(
        Duration::from_secs(timeout),
        Duration::from_millis(200),
        || origin.elapsed(),
        || read_carrier(iface).unwrap_or(false),
        std::thread::sleep,
    );
    println!("{}", r.line(iface));
    match r {
        CarrierWait::Up { .. } => ExitCode::SUCCESS,
        CarrierWait::NoCarrier { .. } => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Measure {
            peer,
            label,
            seconds,
            connect_for,
        } => measure(&peer, &label, seconds, connect_for),
        Cmd::Fetch { url, timeout } => fetch(&url, timeout),
        Cmd::Carrier { iface, timeout } => return carrier(&iface, timeout),
        Cmd::Flood {
            iface,
            seconds,
            burst,
        } => flood(&iface, seconds, burst),
    };
    match r {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
