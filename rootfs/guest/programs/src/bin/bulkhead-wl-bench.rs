//! The guest half of `bulkhead-rootfs bench wl`: runs in an L2 guest and talks to
//! `bulkhead-bench-wl` on the L1 host over the virtio_wl socket named "bench".
//!
//! - `writer`: on `rtt plain <n>` or `rtt fd <n>` does n round trips of a 64-byte message
//!   with L1's echo, without an fd or with one (a 4096-byte shared-memory vfd), and reports
//!   `rtt-done <mean ns>`. On `tput plain|fd <n> <bytes>` it sends n messages of that size
//!   (each with the shared-memory vfd, or none) without waiting, waits for L1's `got`, and
//!   reports `tput-done <ns>`. On `memcpy <reps>` it copies one private buffer of the shared
//!   buffer's size into another `reps` times and reports `memcpy-done <best ns>`: this VM's
//!   own memory bandwidth, the figure zero copy is measured against. On `private <reps>` it
//!   fills a private buffer of that size and reads it back with the same code the shared
//!   buffer gets (a fill, then [`read_all`]) and reports `private-done <fill ns> <read ns>`
//!   (the best rep by their sum). On `shm` it allocates a
//!   shared buffer and sends it to L1 (which passes it to the reader guest); then on each
//!   `go <rep>` it fills the whole buffer with the byte `rep + 1` and reports
//!   `written <rep> <ns>`.
//! - `reader`: receives that buffer (`shm <bytes>` with the fd), answers `ready`, and on each
//!   `written <rep>` reads the whole buffer, checks every byte and reports
//!   `read <rep> <ns> ok|bad`.
//! - `vsock` (the peer, in a guest under QEMU with `vhost-vsock-pci`): connects to L1 over
//!   AF_VSOCK (CID 2, `--vsock-port`) and on each line `rtt <n>` does n round trips of the
//!   same 64-byte message with L1's echo and answers the line `rtt-done <mean ns>`.
//!
//! L1 drives all of them; they end on `done`. Every message waits for its answer, so messages
//! never merge.

use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::time::Instant;

use bulkhead_wl::{SharedMemory, Wl, WlStream};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Role {
    /// Round trips, then writes the shared buffer.
    Writer,
    /// Reads the shared buffer the writer fills.
    Reader,
    /// Round trips over virtio-vsock (the peer the virtio_wl ones are compared with).
    Vsock,
}

/// virtio_wl benchmark guest (see `bulkhead-rootfs bench wl`).
#[derive(Debug, Parser)]
#[command(name = "bulkhead-wl-bench", version)]
struct Args {
    role: Role,
    /// Shared buffer size in MiB (writer).
    #[arg(long, default_value_t = 16)]
    shm_mib: usize,
    /// The virtio_wl socket name to connect to.
    #[arg(long, default_value = "bench")]
    socket: String,
    /// The AF_VSOCK port L1 listens on (role vsock).
    #[arg(long, default_value_t = 5000)]
    vsock_port: u32,
}

const MSG: [u8; 64] = [7; 64];

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

fn recv_text(conn: &WlStream) -> Result<(String, Vec<OwnedFd>), String> {
    let (data, fds) = conn.recv().map_err(err("recv"))?;
    if data.is_empty() && fds.is_empty() {
        return Err("the host hung up".into());
    }
    Ok((String::from_utf8_lossy(&data).into_owned(), fds))
}

/// `rounds` round trips; the mean in ns.
fn round_trips(conn: &WlStream, rounds: u32, fd: Option<&SharedMemory>) -> Result<u128, String> {
    let fds: Vec<_> = fd.iter().map(|m| m.fd()).collect();
    let start = Instant::now();
    for _ in 0..rounds {
        conn.send(&MSG, &fds).map_err(err("send"))?;
        let (data, _) = conn.recv().map_err(err("recv"))?;
        if data.len() != MSG.len() {
            return Err(format!("echo of {} bytes", data.len()));
        }
    }
    Ok(start.elapsed().as_nanos() / u128::from(rounds.max(1)))
}

/// Sends `n` messages of `size` bytes back to back, then waits for L1's `got`; the time in
/// ns.
fn throughput(
    conn: &WlStream,
    n: u32,
    size: usize,
    fd: Option<&SharedMemory>,
) -> Result<u128, String> {
    let fds: Vec<_> = fd.iter().map(|m| m.fd()).collect();
    let data = vec![9u8; size];
    let start = Instant::now();
    for _ in 0..n {
        conn.send(&data, &fds).map_err(err("send"))?;
    }
    let (got, _) = recv_text(conn)?;
    if got != "got" {
        return Err(format!("expected got, got {got:?}"));
    }
    Ok(start.elapsed().as_nanos())
}

/// The best of `reps` copies of one private buffer of `bytes` into another (ns).
fn memcpy_ns(bytes: usize, reps: u32) -> u128 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = u128::MAX;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(start.elapsed().as_nanos());
    }
    best
}

/// The best of `reps` fill + read rounds over a private buffer of `bytes`: the same work
/// the shared buffer gets, on this VM's own memory. Returns (fill ns, read ns).
fn private_ns(bytes: usize, reps: u32) -> (u128, u128) {
    let mut buf = vec![0u8; bytes];
    let mut best = (u128::MAX / 2, u128::MAX / 2);
    for rep in 0..reps.max(1) {
        let want = (rep as u8).wrapping_add(1);
        let start = Instant::now();
        std::hint::black_box(&mut buf).fill(want);
        let fill = start.elapsed().as_nanos();
        let start = Instant::now();
        let ok = read_all(std::hint::black_box(&buf), want);
        let read = start.elapsed().as_nanos();
        if ok && fill + read < best.0 + best.1 {
            best = (fill, read);
        }
    }
    best
}

fn fill_rounds(conn: &WlStream, shm: &mut SharedMemory) -> Result<(), String> {
    loop {
        let (msg, _) = recv_text(conn)?;
        if msg == "done" {
            return Ok(());
        }
        let rep: u8 = msg
            .strip_prefix("go ")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("unexpected {msg:?}"))?;
        let start = Instant::now();
        shm.as_mut_slice().fill(rep.wrapping_add(1));
        let ns = start.elapsed().as_nanos();
        conn.send(format!("written {rep} {ns}").as_bytes(), &[])
            .map_err(err("send written"))?;
    }
}

fn writer(conn: &WlStream, wl: &Wl, a: &Args) -> Result<(), String> {
    let small = wl.alloc(4096).map_err(err("alloc"))?;
    loop {
        let (msg, _) = recv_text(conn)?;
        let words: Vec<&str> = msg.split_whitespace().collect();
        match words.as_slice() {
            ["rtt", kind, n] => {
                let n: u32 = n.parse().map_err(|_| format!("bad {msg:?}"))?;
                let fd = (*kind == "fd").then_some(&small);
                let ns = round_trips(conn, n, fd)?;
                conn.send(format!("rtt-done {ns}").as_bytes(), &[])
                    .map_err(err("send rtt-done"))?;
            }
            ["tput", kind, n, size] => {
                let n: u32 = n.parse().map_err(|_| format!("bad {msg:?}"))?;
                let size: usize = size.parse().map_err(|_| format!("bad {msg:?}"))?;
                let fd = (*kind == "fd").then_some(&small);
                let ns = throughput(conn, n, size.min(1 << 20), fd)?;
                conn.send(format!("tput-done {ns}").as_bytes(), &[])
                    .map_err(err("send tput-done"))?;
            }
            ["memcpy", reps] => {
                let reps: u32 = reps.parse().map_err(|_| format!("bad {msg:?}"))?;
                let ns = memcpy_ns(a.shm_mib << 20, reps);
                conn.send(format!("memcpy-done {ns}").as_bytes(), &[])
                    .map_err(err("send memcpy-done"))?;
            }
            ["private", reps] => {
                let reps: u32 = reps.parse().map_err(|_| format!("bad {msg:?}"))?;
                let (fill, read) = private_ns(a.shm_mib << 20, reps);
                conn.send(format!("private-done {fill} {read}").as_bytes(), &[])
                    .map_err(err("send private-done"))?;
            }
            ["shm"] => {
                let bytes = a.shm_mib << 20;
                let mut shm = wl.alloc(bytes).map_err(err("alloc the shared buffer"))?;
                conn.send(format!("shm {bytes}").as_bytes(), &[shm.fd()])
                    .map_err(err("send shm"))?;
                return fill_rounds(conn, &mut shm);
            }
            ["done"] => return Ok(()),
            _ => return Err(format!("unexpected {msg:?}")),
        }
    }
}

/// Reads every byte; true if all are `want`.
fn read_all(buf: &[u8], want: u8) -> bool {
    let pattern = u64::from_ne_bytes([want; 8]);
    let mut bad = 0u64;
    let mut words = buf.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        bad |= u64::from_ne_bytes(b) ^ pattern;
    }
    for b in words.remainder() {
        bad |= u64::from(b ^ want);
    }
    std::hint::black_box(bad) == 0
}

fn reader(conn: &WlStream) -> Result<(), String> {
    let (msg, fds) = recv_text(conn)?;
    let bytes: usize = msg
        .strip_prefix("shm ")
        .and_then(|b| b.parse().ok())
        .ok_or_else(|| format!("expected shm, got {msg:?}"))?;
    let fd = fds.into_iter().next().ok_or("shm without an fd")?;
    let shm = SharedMemory::map(fd, bytes).map_err(err("map the shared buffer"))?;
    conn.send(b"ready", &[]).map_err(err("send ready"))?;
    loop {
        let (msg, _) = recv_text(conn)?;
        if msg == "done" {
            return Ok(());
        }
        let rep: u8 = msg
            .strip_prefix("written ")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| format!("unexpected {msg:?}"))?;
        let start = Instant::now();
        let ok = read_all(shm.as_slice(), rep.wrapping_add(1));
        let ns = start.elapsed().as_nanos();
        let verdict = if ok { "ok" } else { "bad" };
        conn.send(format!("read {rep} {ns} {verdict}").as_bytes(), &[])
            .map_err(err("send read"))?;
    }
}

/// The vsock peer: line commands from L1, 64-byte round trips with its echo.
fn vsock(a: &Args) -> Result<(), String> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::io::{BufRead, BufReader, Read, Write};
    const VMADDR_CID_HOST: u32 = 2;
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket(AF_VSOCK)"))?;
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &VsockAddr::new(VMADDR_CID_HOST, a.vsock_port),
    )
    .map_err(err("connect to the host over vsock"))?;
    let mut conn = std::fs::File::from(fd);
    let mut lines = BufReader::new(conn.try_clone().map_err(err("dup"))?);
    let mut echo = [0u8; 64];
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).map_err(err("read"))? == 0 {
            return Err("the host hung up".into());
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["rtt", n] => {
                let n: u32 = n.parse().map_err(|_| format!("bad {line:?}"))?;
                let start = Instant::now();
                for _ in 0..n {
                    conn.write_all(&MSG).map_err(err("send"))?;
                    // The echo is the only thing L1 sends until rtt-done, so the buffered
                    // reader holds nothing of it.
                    lines.read_exact(&mut echo).map_err(err("recv"))?;
                    if echo != MSG {
                        return Err("the echo differs".into());
                    }
                }
                let ns = start.elapsed().as_nanos() / u128::from(n.max(1));
                conn.write_all(format!("rtt-done {ns}\n").as_bytes())
                    .map_err(err("send rtt-done"))?;
            }
            ["done"] => return Ok(()),
            _ => return Err(format!("unexpected {line:?}")),
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    if let Role::Vsock = a.role {
        return vsock(a);
    }
    let wl = Wl::open().map_err(err("open /dev/wl0"))?;
    let conn = wl.connect(&a.socket).map_err(err("connect"))?;
    match a.role {
        Role::Writer => writer(&conn, &wl, a),
        Role::Reader => reader(&conn),
        Role::Vsock => Ok(()),
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => {
            println!("bulkhead-wl-bench: {:?} done", a.role);
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("bulkhead-wl-bench: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
