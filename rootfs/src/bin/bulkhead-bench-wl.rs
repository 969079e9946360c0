//! Runs inside a Bulkhead host (L1) for `bulkhead-rootfs bench wl`. Starts two bulkhead-vmm
//! guests running `bulkhead-wl-bench` (a writer and a reader) with a virtio_wl socket each,
//! and measures, in the same run:
//!
//! 1. round trips of a 64-byte SEND/RECV between the writer guest and this program (an echo),
//!    without an fd and with one (a 4096-byte shared-memory vfd), against the same exchange
//!    over a plain Unix socketpair between two threads here (with a memfd for the fd case),
//!    in alternating batches so that both see the same background load (medians count);
//! 2. SEND throughput: the writer guest sends 4 KiB messages back to back (without and with
//!    an fd) and this program reads them all, against the same over a socketpair here;
//! 3. shared-memory bandwidth between the two guests: the writer fills a buffer that this
//!    program passed on to the reader, the reader reads all of it and checks it, against a
//!    memcpy of the same size here.
//!
//! Prints a table (`wl-bench: …`) and one `BENCH wl …` line.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use clap::Parser;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

#[derive(Parser)]
#[command(
    about = "virtio_wl round trips and guest-to-guest shared memory against socketpair and memcpy"
)]
struct Args {
    #[arg(long, default_value = "/bin/bulkhead-vmm")]
    vmm: String,
    #[arg(long)]
    kernel: String,
    /// Initramfs of the writer guest (runs `bulkhead-wl-bench writer`).
    #[arg(long)]
    writer_initramfs: String,
    /// Initramfs of the reader guest (runs `bulkhead-wl-bench reader`).
    #[arg(long)]
    reader_initramfs: String,
    /// Round trips per kind (in 5 batches).
    #[arg(long, default_value_t = 300)]
    rounds: u32,
    /// Shared buffer size in MiB (must match the writer guest's).
    #[arg(long, default_value_t = 16)]
    shm_mib: usize,
    /// Write/read repetitions of the shared buffer (the best one counts).
    #[arg(long, default_value_t = 4)]
    reps: u8,
}

const WARMUP: u32 = 20;
const BATCHES: u32 = 5;
/// Throughput: messages per batch, bytes per message, batches.
const TPUT_MESSAGES: u32 = 100;
const TPUT_BYTES: usize = 4096;
const TPUT_BATCHES: u32 = 3;
/// The L1 peer's batches are this many times longer than the guest's (the same exchange,
/// more often), so that they last about as long and average over the same kind of
/// scheduling noise; results are per message.
const PEER_FACTOR: u32 = 10;
const MSG: [u8; 64] = [7; 64];
const MAX_FDS: usize = 28;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// One message and the fds it carried (owned; dropping them closes them).
fn recv_msg(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(err("recvmsg"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(err("cmsgs"))? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: fds received by SCM_RIGHTS are new and owned by nobody else.
            fds.extend(
                list.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}

fn send_msg(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(err("sendmsg"))?;
    if n != data.len() {
        return Err(format!("short send: {n} of {}", data.len()));
    }
    Ok(())
}

fn recv_text(sock: &UnixStream) -> Result<(String, Vec<OwnedFd>), String> {
    let (data, fds) = recv_msg(sock.as_fd())?;
    if data.is_empty() && fds.is_empty() {
        return Err("the guest hung up".into());
    }
    Ok((String::from_utf8_lossy(&data).into_owned(), fds))
}

fn send_text(sock: &UnixStream, text: &str) -> Result<(), String> {
    send_msg(sock.as_fd(), text.as_bytes(), &[])
}

/// One batch of round trips in the writer guest: asks for `n`, echoes them (closing any
/// fds), returns the guest's mean in ns.
fn guest_batch(writer: &UnixStream, n: u32, with_fd: bool) -> Result<u128, String> {
    let kind = if with_fd { "fd" } else { "plain" };
    send_text(writer, &format!("rtt {kind} {n}"))?;
    loop {
        let (data, fds) = recv_msg(writer.as_fd())?;
        drop(fds);
        if data.is_empty() {
            return Err("the writer guest hung up during the round trips".into());
        }
        if let Some(rest) = data.strip_prefix(b"rtt-done ") {
            let text = String::from_utf8_lossy(rest);
            return text
                .trim()
                .parse()
                .map_err(|_| format!("bad report {text:?}"));
        }
        send_msg(writer.as_fd(), &data, &[])?;
    }
}

/// Puts this thread on CPU 0 only. The socketpair peers' two threads share one CPU: under
/// emulation a wake-up across vCPUs costs milliseconds and varies tenfold from run to run,
/// while on one CPU the figure is stable (and closer to what the same exchange costs on real
/// hardware either way).
fn pin_to_cpu0() {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    if set.set(0).is_ok() {
        let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Runs `f` with this thread on CPU 0, then gives it back its CPUs.
fn on_cpu0<T>(f: impl FnOnce() -> T) -> T {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    let me = nix::unistd::Pid::from_raw(0);
    let before = sched_getaffinity(me).ok();
    pin_to_cpu0();
    let result = f();
    if let Some(set) = before {
        let _ = sched_setaffinity(me, &set);
    }
    result
}

/// The L1 peer: an echo thread on one end of a socketpair.
struct SocketpairEcho {
    ours: UnixStream,
    memfd: OwnedFd,
    echo: std::thread::JoinHandle<Result<(), String>>,
}

impl SocketpairEcho {
    fn start() -> Result<Self, String> {
        let (ours, theirs) = UnixStream::pair().map_err(err("socketpair"))?;
        let echo = std::thread::spawn(move || -> Result<(), String> {
            pin_to_cpu0();
            loop {
                let (data, fds) = recv_msg(theirs.as_fd())?;
                drop(fds);
                if data.is_empty() {
                    return Ok(());
                }
                send_msg(theirs.as_fd(), &data, &[])?;
            }
        });
        let memfd = nix::sys::memfd::memfd_create(c"bench", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(err("memfd_create"))?;
        nix::unistd::ftruncate(&memfd, 4096).map_err(err("ftruncate"))?;
        Ok(Self { ours, memfd, echo })
    }

    /// `n` round trips; the mean in ns.
    fn batch(&self, n: u32, with_fd: bool) -> Result<u128, String> {
        let fds: Vec<BorrowedFd<'_>> = if with_fd {
            vec![self.memfd.as_fd()]
        } else {
            Vec::new()
        };
        on_cpu0(|| {
            let start = Instant::now();
            for _ in 0..n {
                send_msg(self.ours.as_fd(), &MSG, &fds)?;
                let (data, _) = recv_msg(self.ours.as_fd())?;
                if data.len() != MSG.len() {
                    return Err(format!("echo of {} bytes", data.len()));
                }
            }
            Ok(start.elapsed().as_nanos() / u128::from(n.max(1)))
        })
    }

    fn finish(self) -> Result<(), String> {
        drop(self.ours);
        self.echo
            .join()
            .map_err(|_| "the echo thread panicked".to_string())?
    }
}

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Median batch means: [[virtio_wl, socketpair] without an fd, [virtio_wl, socketpair] with].
fn round_trips(writer: &UnixStream, rounds: u32) -> Result<[[u128; 2]; 2], String> {
    let peer = SocketpairEcho::start()?;
    for with_fd in [false, true] {
        guest_batch(writer, WARMUP, with_fd)?;
        peer.batch(WARMUP, with_fd)?;
    }
    let n = (rounds / BATCHES).max(1);
    let mut samples: [[Vec<u128>; 2]; 2] = Default::default();
    for b in 0..BATCHES {
        for (kind, with_fd) in samples.iter_mut().zip([false, true]) {
            let wl = guest_batch(writer, n, with_fd)?;
            let sp = peer.batch(n * PEER_FACTOR, with_fd)?;
            println!(
                "wl-bench: batch {b} {}: round trip virtio_wl {wl} ns (mean of {n}), socketpair {sp} ns (mean of {})",
                if with_fd { "with an fd" } else { "without fd" },
                n * PEER_FACTOR
            );
            kind[0].push(wl);
            kind[1].push(sp);
        }
    }
    peer.finish()?;
    let [[pw, ps], [fw, fs]] = samples;
    Ok([[median(pw), median(ps)], [median(fw), median(fs)]])
}

/// Reads `total` bytes (closing any fds) from `from`, then answers `got`.
fn sink(from: &UnixStream, total: usize) -> Result<(), String> {
    let mut got = 0;
    while got < total {
        let (data, fds) = recv_msg(from.as_fd())?;
        drop(fds);
        if data.is_empty() {
            return Err(format!("hung up after {got} of {total} bytes"));
        }
        got += data.len();
    }
    if got != total {
        return Err(format!("{got} bytes, expected {total}"));
    }
    send_text(from, "got")
}

/// One throughput batch in the writer guest; the guest's time in ns.
fn guest_tput(writer: &UnixStream, with_fd: bool) -> Result<u128, String> {
    let kind = if with_fd { "fd" } else { "plain" };
    send_text(writer, &format!("tput {kind} {TPUT_MESSAGES} {TPUT_BYTES}"))?;
    sink(writer, TPUT_MESSAGES as usize * TPUT_BYTES)?;
    let (done, _) = recv_text(writer)?;
    done.strip_prefix("tput-done ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("expected tput-done, got {done:?}"))
}

/// The same batch over a socketpair between two threads here, `PEER_FACTOR` times over; the
/// time per `TPUT_MESSAGES` messages in ns.
fn socketpair_tput(with_fd: bool) -> Result<u128, String> {
    let (ours, theirs) = UnixStream::pair().map_err(err("socketpair"))?;
    let messages = TPUT_MESSAGES * PEER_FACTOR;
    let reader = std::thread::spawn(move || {
        pin_to_cpu0();
        sink(&theirs, messages as usize * TPUT_BYTES)
    });
    let memfd = nix::sys::memfd::memfd_create(c"bench", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(err("memfd_create"))?;
    let fds: Vec<BorrowedFd<'_>> = if with_fd {
        vec![memfd.as_fd()]
    } else {
        Vec::new()
    };
    let data = vec![9u8; TPUT_BYTES];
    let (got, ns) = on_cpu0(|| {
        let start = Instant::now();
        for _ in 0..messages {
            send_msg(ours.as_fd(), &data, &fds)?;
        }
        let (got, _) = recv_text(&ours)?;
        Ok::<_, String>((got, start.elapsed().as_nanos() / u128::from(PEER_FACTOR)))
    })?;
    reader
        .join()
        .map_err(|_| "the sink thread panicked".to_string())??;
    if got != "got" {
        return Err(format!("expected got, got {got:?}"));
    }
    Ok(ns)
}

/// Median batch times: [[virtio_wl, socketpair] without an fd, [virtio_wl, socketpair] with].
fn throughputs(writer: &UnixStream) -> Result<[[u128; 2]; 2], String> {
    let mut samples: [[Vec<u128>; 2]; 2] = Default::default();
    for b in 0..TPUT_BATCHES {
        for (kind, with_fd) in samples.iter_mut().zip([false, true]) {
            let wl = guest_tput(writer, with_fd)?;
            let sp = socketpair_tput(with_fd)?;
            println!(
                "wl-bench: batch {b} {}: {TPUT_MESSAGES} x {TPUT_BYTES} bytes virtio_wl {wl} ns, socketpair {sp} ns (mean of {PEER_FACTOR})",
                if with_fd { "with an fd" } else { "without fd" }
            );
            kind[0].push(wl);
            kind[1].push(sp);
        }
    }
    let [[pw, ps], [fw, fs]] = samples;
    Ok([[median(pw), median(ps)], [median(fw), median(fs)]])
}

/// The best of `reps` memcpys of `bytes` (ns).
fn memcpy_ns(bytes: usize, reps: u8) -> u128 {
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

/// Moves the shared buffer from the writer to the reader and times `reps` write/read
/// rounds; returns the best (write_ns, read_ns) by their sum.
fn shared_memory(
    writer: &UnixStream,
    reader: &UnixStream,
    bytes: usize,
    reps: u8,
) -> Result<(u128, u128), String> {
    send_text(writer, "shm")?;
    let (msg, fds) = recv_text(writer)?;
    if msg != format!("shm {bytes}") || fds.len() != 1 {
        return Err(format!(
            "expected the shared buffer, got {msg:?} with {} fds",
            fds.len()
        ));
    }
    let shared: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    send_msg(reader.as_fd(), msg.as_bytes(), &shared)?;
    drop(fds);
    let (ready, _) = recv_text(reader)?;
    if ready != "ready" {
        return Err(format!("reader: expected ready, got {ready:?}"));
    }
    let mut best: Option<(u128, u128)> = None;
    for rep in 0..reps.max(1) {
        send_text(writer, &format!("go {rep}"))?;
        let (w, _) = recv_text(writer)?;
        let write_ns = w
            .strip_prefix(&format!("written {rep} "))
            .and_then(|n| n.parse::<u128>().ok())
            .ok_or_else(|| format!("writer: {w:?}"))?;
        send_text(reader, &format!("written {rep}"))?;
        let (r, _) = recv_text(reader)?;
        let rest = r
            .strip_prefix(&format!("read {rep} "))
            .ok_or_else(|| format!("reader: {r:?}"))?;
        let (ns, verdict) = rest
            .split_once(' ')
            .ok_or_else(|| format!("reader: {r:?}"))?;
        if verdict != "ok" {
            return Err(format!(
                "rep {rep}: the reader saw other bytes than the writer wrote"
            ));
        }
        let read_ns: u128 = ns.parse().map_err(|_| format!("reader: {r:?}"))?;
        println!("wl-bench: shm rep {rep}: writer filled {bytes} bytes in {write_ns} ns, reader read them in {read_ns} ns");
        if best.is_none_or(|(bw, br)| write_ns + read_ns < bw + br) {
            best = Some((write_ns, read_ns));
        }
    }
    best.ok_or_else(|| "no repetitions".to_string())
}

/// Prints a child's output line by line as `vm-<role>: …`, so the two VMMs' consoles never
/// mix with each other or with our own lines.
fn forward_lines(from: impl std::io::Read + Send + 'static, role: &'static str) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            println!("vm-{role}: {}", String::from_utf8_lossy(&line).trim_end());
        }
    });
}

fn spawn_vmm(a: &Args, role: &'static str, initramfs: &str, socket: &str) -> Result<Child, String> {
    let mut child = Command::new(&a.vmm)
        .args(["--kernel", &a.kernel, "--initramfs", initramfs])
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .args(["--memory", "192M", "--vcpus", "1"])
        .args(["--wl-socket", socket])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", a.vmm))?;
    if let Some(out) = child.stdout.take() {
        forward_lines(out, role);
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, role);
    }
    Ok(child)
}

/// Accepts one connection, giving up if a VMM has exited (a guest that failed before
/// connecting would otherwise leave us waiting forever).
fn accept(listener: &UnixListener, vmms: &mut [Child], what: &str) -> Result<UnixStream, String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(1000u16)).map_err(err("poll"))?;
        if ready > 0 {
            return listener
                .accept()
                .map(|(s, _)| s)
                .map_err(|e| format!("accept the {what}: {e}"));
        }
        if vmms.iter_mut().any(|v| matches!(v.try_wait(), Ok(Some(_)))) {
            return Err(format!("a VMM exited before the {what} guest connected"));
        }
    }
}

fn bind(path: &str) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))
}

fn mib_per_s(bytes: usize, ns: u128) -> f64 {
    bytes as f64 / (1 << 20) as f64 / (ns.max(1) as f64 / 1e9)
}

fn run(a: &Args) -> Result<(), String> {
    let (wpath, rpath) = ("/run/wl-bench-writer.sock", "/run/wl-bench-reader.sock");
    let wl_writer = bind(wpath)?;
    let wl_reader = bind(rpath)?;
    let mut vmms = [
        spawn_vmm(a, "writer", &a.writer_initramfs, &format!("bench={wpath}"))?,
        spawn_vmm(a, "reader", &a.reader_initramfs, &format!("bench={rpath}"))?,
    ];
    let result = (|| {
        let writer = accept(&wl_writer, &mut vmms, "writer")?;
        let reader = accept(&wl_reader, &mut vmms, "reader")?;
        // Both guests are up (and now wait idle) before anything is measured.
        let rtts = round_trips(&writer, a.rounds)?;
        let tputs = throughputs(&writer)?;
        let bytes = a.shm_mib << 20;
        let (write_ns, read_ns) = shared_memory(&writer, &reader, bytes, a.reps)?;
        let copy_ns = memcpy_ns(bytes, a.reps);
        send_text(&writer, "done")?;
        send_text(&reader, "done")?;
        Ok::<_, String>((rtts, tputs, write_ns, read_ns, copy_ns))
    })();
    for v in vmms.iter_mut() {
        if result.is_err() {
            let _ = v.kill();
        }
        let _ = v.wait();
    }
    let ([[rtt, sp_rtt], [fd_rtt, sp_fd_rtt]], tputs, write_ns, read_ns, copy_ns) = result?;
    let bytes = a.shm_mib << 20;
    let shm_ns = write_ns + read_ns;
    let ratio = |x: u128, y: u128| x as f64 / y.max(1) as f64;
    println!(
        "wl-bench: {:<50} {:>14} {:>14} {:>8}",
        "measure", "virtio_wl", "L1 peer", "ratio"
    );
    println!(
        "wl-bench: {:<50} {:>11} ns {:>11} ns {:>8.1}",
        "64-byte round trip, median (vs socketpair)",
        rtt,
        sp_rtt,
        ratio(rtt, sp_rtt)
    );
    println!(
        "wl-bench: {:<50} {:>11} ns {:>11} ns {:>8.1}",
        "64-byte round trip + 1 fd, median (vs socketpair)",
        fd_rtt,
        sp_fd_rtt,
        ratio(fd_rtt, sp_fd_rtt)
    );
    let tput_bytes = TPUT_MESSAGES as usize * TPUT_BYTES;
    for ([wl, sp], label) in tputs.into_iter().zip(["", " + 1 fd each"]) {
        let (wl_bw, sp_bw) = (mib_per_s(tput_bytes, wl), mib_per_s(tput_bytes, sp));
        println!(
            "wl-bench: {:<50} {:>8.1} MiB/s {:>8.1} MiB/s {:>8.3}",
            format!("{TPUT_BYTES}-byte SENDs{label}, median (vs socketpair)"),
            wl_bw,
            sp_bw,
            wl_bw / sp_bw
        );
    }
    let (shm_bw, copy_bw) = (mib_per_s(bytes, shm_ns), mib_per_s(bytes, copy_ns));
    println!(
        "wl-bench: {:<50} {:>8.1} MiB/s {:>8.1} MiB/s {:>8.3}",
        format!("{} MiB guest->guest shm (vs memcpy)", a.shm_mib),
        shm_bw,
        copy_bw,
        shm_bw / copy_bw
    );
    println!(
        "wl-bench: shm: writer fill {} ns ({:.1} MiB/s), reader read {} ns ({:.1} MiB/s); memcpy {} ns",
        write_ns,
        mib_per_s(bytes, write_ns),
        read_ns,
        mib_per_s(bytes, read_ns),
        copy_ns
    );
    println!(
        "wl-bench: ratio = virtio_wl / L1 peer: for times, how many times slower; for MiB/s, the fraction reached"
    );
    println!(
        "BENCH wl rtt_ratio_vs_socketpair={:.2} fd_rtt_ratio_vs_socketpair={:.2} shm_bw_ratio_vs_memcpy={:.3}",
        ratio(rtt, sp_rtt),
        ratio(fd_rtt, sp_fd_rtt),
        shm_bw / copy_bw
    );
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("wl-bench: FAIL {e}");
            ExitCode::FAILURE
        }
    }
}
