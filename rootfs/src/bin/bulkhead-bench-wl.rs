//! Runs inside a Bulkhead host (L1) for `bulkhead-rootfs bench wl`. Starts two bulkhead-vmm
//! guests running `bulkhead-wl-bench` (a writer and a reader) with a virtio_wl socket each,
//! and a third guest under QEMU with `vhost-vsock-pci` (the vsock peer), and measures, in the
//! same run:
//!
//! 1. round trips of a 64-byte message between the writer guest and this program (an echo),
//!    without an fd and with one (a 4096-byte shared-memory vfd), against the same exchange
//!    over virtio-vsock between the QEMU guest and this program (what a user would pick for a
//!    VM-to-host channel; it cannot carry fds, so the fd case is compared with its plain
//!    round trip) and over a plain Unix socketpair between two threads here (with a memfd for
//!    the fd case), in alternating batches so that all see the same background load
//!    (medians count);
//! 2. SEND throughput: the writer guest sends 4 KiB messages back to back (without and with
//!    an fd) and this program reads them all, against the same over a socketpair here;
//! 3. shared-memory bandwidth between the two guests: the writer fills a buffer that this
//!    program passed on to the reader, the reader reads all of it and checks it, against a
//!    memcpy between two private buffers inside the writer guest (the VM's own memory) and
//!    a memcpy of the same size here.
//!
//! Prints a table (`wl-bench: …`) and one `BENCH wl …` line.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, ExitCode, Stdio};

use bulkhead_rootfs::bench::wl_peers::{
    memcpy_ns, recv_msg, recv_text, send_msg, send_text, sink, socketpair_tput, SocketpairEcho,
    VsockListener, VsockPeer,
};
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "virtio_wl round trips and guest-to-guest shared memory against vsock, socketpair and memcpy"
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
    /// Initramfs of the vsock guest (runs `bulkhead-wl-bench vsock`), booted under QEMU.
    #[arg(long)]
    vsock_initramfs: String,
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: String,
    /// The AF_VSOCK port this program listens on for the vsock guest.
    #[arg(long, default_value_t = 5000)]
    vsock_port: u32,
    /// Round trips per kind (in 5 batches).
    #[arg(long, default_value_t = 300)]
    rounds: u32,
    /// Shared buffer size in MiB (must match the writer guest's).
    #[arg(long, default_value_t = 16)]
    shm_mib: usize,
    /// Write/read repetitions of the shared buffer (the best one counts).
    #[arg(long, default_value_t = 4)]
    reps: u8,
    /// Another bulkhead-vmm build, as NAME=PATH (repeatable): a second writer guest under it
    /// takes part in the same round-trip batches (a before/after comparison in one boot).
    #[arg(long = "also-vmm", value_name = "NAME=PATH")]
    also_vmm: Vec<String>,
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
/// The vsock guest's CID.
const VSOCK_GUEST_CID: u32 = 3;
/// How long the vsock guest may take to connect once the writers are up.
const VSOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

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

fn median(mut v: Vec<u128>) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The median of per-batch ratios `x[i] / y[i]`: each batch's virtio_wl time against the
/// peer's time in the same batch, so that a load change between batches (this machine is
/// shared) cancels out instead of skewing one median against the other.
fn paired_ratio(x: &[u128], y: &[u128]) -> Option<f64> {
    let mut r: Vec<f64> = x
        .iter()
        .zip(y)
        .map(|(a, b)| *a as f64 / (*b).max(1) as f64)
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    Some(r[r.len() / 2])
}

/// Median batch means of the round trips (ns).
struct RoundTrips {
    /// Per writer (the primary first): without an fd, with one.
    wl: Vec<(u128, u128)>,
    /// None if the vsock guest never came up.
    vsock: Option<u128>,
    /// Per writer: the median of per-batch ratios to vsock, without an fd and with one.
    vsock_paired: Vec<Option<(f64, f64)>>,
    socketpair: u128,
    socketpair_fd: u128,
}

fn round_trips(
    writers: &[(String, UnixStream)],
    mut vsock: Option<&mut VsockPeer>,
    rounds: u32,
) -> Result<RoundTrips, String> {
    let peer = SocketpairEcho::start()?;
    for with_fd in [false, true] {
        for (_, w) in writers {
            guest_batch(w, WARMUP, with_fd)?;
        }
        peer.batch(WARMUP, with_fd)?;
    }
    if let Some(v) = vsock.as_deref_mut() {
        v.batch(WARMUP)?;
    }
    let n = (rounds / BATCHES).max(1);
    let m = n * PEER_FACTOR;
    let mut wl: Vec<[Vec<u128>; 2]> = writers.iter().map(|_| Default::default()).collect();
    let (mut vs, mut sp, mut sp_fd) = (Vec::new(), Vec::new(), Vec::new());
    for b in 0..BATCHES {
        // Each batch starts with the next writer: no VMM build always goes first.
        let order: Vec<usize> = (0..writers.len())
            .map(|i| (i + b as usize) % writers.len())
            .collect();
        for &i in &order {
            let ((name, w), samples) = (&writers[i], &mut wl[i]);
            let t = guest_batch(w, n, false)?;
            println!("wl-bench: batch {b} without fd: virtio_wl ({name}) {t} ns (mean of {n})");
            samples[0].push(t);
        }
        if let Some(v) = vsock.as_deref_mut() {
            let t = v.batch(n)?;
            println!("wl-bench: batch {b} without fd: vsock {t} ns (mean of {n})");
            vs.push(t);
        }
        let t = peer.batch(m, false)?;
        println!("wl-bench: batch {b} without fd: socketpair {t} ns (mean of {m})");
        sp.push(t);
        for &i in &order {
            let ((name, w), samples) = (&writers[i], &mut wl[i]);
            let t = guest_batch(w, n, true)?;
            println!("wl-bench: batch {b} with an fd: virtio_wl ({name}) {t} ns (mean of {n})");
            samples[1].push(t);
        }
        let t = peer.batch(m, true)?;
        println!("wl-bench: batch {b} with an fd: socketpair {t} ns (mean of {m})");
        sp_fd.push(t);
    }
    peer.finish()?;
    let vsock_paired = wl
        .iter()
        .map(|[p, f]| Some((paired_ratio(p, &vs)?, paired_ratio(f, &vs)?)))
        .collect();
    Ok(RoundTrips {
        vsock_paired,
        wl: wl
            .into_iter()
            .map(|[p, f]| (median(p), median(f)))
            .collect(),
        vsock: (!vs.is_empty()).then(|| median(vs)),
        socketpair: median(sp),
        socketpair_fd: median(sp_fd),
    })
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

/// Median batch times: [[virtio_wl, socketpair] without an fd, [virtio_wl, socketpair] with].
/// The socketpair's batches are `PEER_FACTOR` times longer; its time is per `TPUT_MESSAGES`.
fn throughputs(writer: &UnixStream) -> Result<[[u128; 2]; 2], String> {
    let mut samples: [[Vec<u128>; 2]; 2] = Default::default();
    for b in 0..TPUT_BATCHES {
        for (kind, with_fd) in samples.iter_mut().zip([false, true]) {
            let wl = guest_tput(writer, with_fd)?;
            let sp = socketpair_tput(TPUT_MESSAGES * PEER_FACTOR, TPUT_BYTES, with_fd)?
                / u128::from(PEER_FACTOR);
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

/// The writer guest's memcpy between two private buffers of the shared buffer's size: the
/// best of `reps` (ns).
fn guest_memcpy(writer: &UnixStream, reps: u8) -> Result<u128, String> {
    send_text(writer, &format!("memcpy {reps}"))?;
    let (done, _) = recv_text(writer)?;
    done.strip_prefix("memcpy-done ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("expected memcpy-done, got {done:?}"))
}

/// The writer guest's fill + read of a private buffer of the shared buffer's size (the same
/// code as for the shared one): the best of `reps`, (fill ns, read ns).
fn guest_private(writer: &UnixStream, reps: u8) -> Result<(u128, u128), String> {
    send_text(writer, &format!("private {reps}"))?;
    let (done, _) = recv_text(writer)?;
    let mut words = done
        .strip_prefix("private-done ")
        .unwrap_or("")
        .split_whitespace()
        .map(|w| w.parse::<u128>().ok());
    match (words.next().flatten(), words.next().flatten()) {
        (Some(f), Some(r)) => Ok((f, r)),
        _ => Err(format!("expected private-done, got {done:?}")),
    }
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

/// Prints a child's output line by line as `vm-<role>: …`, so the consoles never mix with
/// each other or with our own lines.
fn forward_lines(from: impl std::io::Read + Send + 'static, role: &'static str) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            println!("vm-{role}: {}", String::from_utf8_lossy(&line).trim_end());
        }
    });
}

fn spawn(mut cmd: Command, role: &'static str) -> Result<Child, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(out) = child.stdout.take() {
        forward_lines(out, role);
    }
    if let Some(err) = child.stderr.take() {
        forward_lines(err, role);
    }
    Ok(child)
}

fn spawn_vmm(
    vmm: &str,
    role: &'static str,
    kernel: &str,
    initramfs: &str,
    socket: &str,
) -> Result<Child, String> {
    let mut cmd = Command::new(vmm);
    cmd.args(["--kernel", kernel, "--initramfs", initramfs])
        .args(["--cmdline", "console=ttyS0 panic=-1 quiet"])
        .args(["--memory", "192M", "--vcpus", "1"])
        .args(["--wl-socket", socket]);
    spawn(cmd, role)
}

/// The vsock peer: QEMU microvm with a PCIe bus, the guest's vsock device backed by the host
/// kernel's vhost-vsock.
fn spawn_vsock_guest(a: &Args) -> Result<Child, String> {
    let mut cmd = Command::new(&a.qemu);
    cmd.args(["-M", "microvm,pcie=on", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", "192M", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-kernel", &a.kernel, "-initrd", &a.vsock_initramfs])
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-device",
            &format!("vhost-vsock-pci,guest-cid={VSOCK_GUEST_CID},disable-legacy=on"),
        ]);
    spawn(cmd, "vsock")
}

fn any_exited(children: &mut [Child]) -> bool {
    children
        .iter_mut()
        .any(|v| matches!(v.try_wait(), Ok(Some(_))))
}

/// Accepts one connection, giving up if a VM has exited (a guest that failed before
/// connecting would otherwise leave us waiting forever).
fn accept(listener: &UnixListener, vms: &mut [Child], what: &str) -> Result<UnixStream, String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(1000u16)).map_err(|e| format!("poll: {e}"))?;
        if ready > 0 {
            return listener
                .accept()
                .map(|(s, _)| s)
                .map_err(|e| format!("accept the {what}: {e}"));
        }
        if any_exited(vms) {
            return Err(format!("a VM exited before the {what} guest connected"));
        }
    }
}

/// The vsock guest, if it connects within `VSOCK_WAIT` and its QEMU keeps running; the
/// figures without it are still measured.
fn accept_vsock(listener: &VsockListener, qemu: &mut Child) -> Result<VsockPeer, String> {
    let end = std::time::Instant::now() + VSOCK_WAIT;
    loop {
        if let Some(peer) = listener.accept_within_a_second()? {
            return Ok(peer);
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(format!("its QEMU exited ({status})"));
        }
        if std::time::Instant::now() > end {
            return Err(format!(
                "it did not connect within {} s",
                VSOCK_WAIT.as_secs()
            ));
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

/// Everything measured.
struct Figures {
    /// The writers' VMM names (the primary first).
    names: Vec<String>,
    rtt: RoundTrips,
    tputs: [[u128; 2]; 2],
    write_ns: u128,
    read_ns: u128,
    guest_copy_ns: u128,
    /// The writer guest's fill + read of a private buffer (the shared buffer's work).
    private_ns: (u128, u128),
    l1_copy_ns: u128,
}

fn run(a: &Args) -> Result<(), String> {
    let mut writer_vmms = vec![("bulkhead-vmm".to_string(), a.vmm.clone())];
    for spec in &a.also_vmm {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| format!("--also-vmm {spec:?}: expected NAME=PATH"))?;
        writer_vmms.push((name.to_string(), path.to_string()));
    }
    let mut listeners = Vec::new();
    let mut vms = Vec::new();
    let kill_all = |vms: &mut Vec<Child>| {
        for v in vms.iter_mut() {
            let _ = v.kill();
            let _ = v.wait();
        }
    };
    for (i, (name, vmm)) in writer_vmms.iter().enumerate() {
        let path = format!("/run/wl-bench-writer-{i}.sock");
        listeners.push((name.clone(), bind(&path)?));
        match spawn_vmm(
            vmm,
            "writer",
            &a.kernel,
            &a.writer_initramfs,
            &format!("bench={path}"),
        ) {
            Ok(c) => vms.push(c),
            Err(e) => {
                kill_all(&mut vms);
                return Err(e);
            }
        }
    }
    let rpath = "/run/wl-bench-reader.sock";
    let wl_reader = bind(rpath)?;
    let vsock_listener = VsockListener::bind(a.vsock_port)?;
    match spawn_vmm(
        &a.vmm,
        "reader",
        &a.kernel,
        &a.reader_initramfs,
        &format!("bench={rpath}"),
    ) {
        Ok(c) => vms.push(c),
        Err(e) => {
            kill_all(&mut vms);
            return Err(e);
        }
    }
    let mut qemu = match spawn_vsock_guest(a) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("wl-bench: the vsock peer cannot start: {e}");
            None
        }
    };
    let result = (|| {
        let mut writers = Vec::new();
        for (name, l) in &listeners {
            writers.push((name.clone(), accept(l, &mut vms, "writer")?));
        }
        let reader = accept(&wl_reader, &mut vms, "reader")?;
        let mut vsock = match qemu.as_mut().map(|q| accept_vsock(&vsock_listener, q)) {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                println!("wl-bench: no vsock peer: {e}");
                None
            }
            None => None,
        };
        // Every guest is up (and now waits idle) before anything is measured.
        let rtt = round_trips(&writers, vsock.as_mut(), a.rounds)?;
        if let Some(v) = vsock {
            v.done()?;
        }
        let writer = &writers.first().ok_or("no writer")?.1;
        let tputs = throughputs(writer)?;
        let bytes = a.shm_mib << 20;
        let guest_copy_ns = guest_memcpy(writer, a.reps)?;
        let private_ns = guest_private(writer, a.reps)?;
        let (write_ns, read_ns) = shared_memory(writer, &reader, bytes, a.reps)?;
        let l1_copy_ns = memcpy_ns(bytes, a.reps);
        for (_, w) in &writers {
            send_text(w, "done")?;
        }
        send_text(&reader, "done")?;
        Ok::<_, String>(Figures {
            names: writers.iter().map(|(n, _)| n.clone()).collect(),
            rtt,
            tputs,
            write_ns,
            read_ns,
            guest_copy_ns,
            private_ns,
            l1_copy_ns,
        })
    })();
    vms.extend(qemu);
    for v in vms.iter_mut() {
        if result.is_err() {
            let _ = v.kill();
        }
        let _ = v.wait();
    }
    print_results(a, &result?);
    Ok(())
}

fn print_results(a: &Args, f: &Figures) {
    let ratio = |x: u128, y: u128| x as f64 / y.max(1) as f64;
    let r = &f.rtt;
    let vsock = r.vsock.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let paired = |x: Option<f64>| x.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    println!(
        "wl-bench: {:<44} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "round trips (ns), median of 5 batch means",
        "virtio_wl",
        "vsock",
        "socketpair",
        "/vsock*",
        "/sockpair"
    );
    for ((name, (plain, fd)), vp) in f.names.iter().zip(&r.wl).zip(&r.vsock_paired) {
        for (label, wl, sp, vr) in [
            (
                format!("64 bytes, {name}"),
                *plain,
                r.socketpair,
                vp.map(|v| v.0),
            ),
            (
                format!("64 bytes + 1 fd, {name} (vsock: no fd)"),
                *fd,
                r.socketpair_fd,
                vp.map(|v| v.1),
            ),
        ] {
            println!(
                "wl-bench: {:<44} {:>12} {:>12} {:>12} {:>9} {:>9.1}",
                label,
                wl,
                vsock,
                sp,
                paired(vr),
                ratio(wl, sp)
            );
        }
    }
    println!(
        "wl-bench: * /vsock is the median of per-batch ratios (each batch's virtio_wl mean over the same batch's vsock mean)"
    );
    let tput_bytes = TPUT_MESSAGES as usize * TPUT_BYTES;
    for ([wl, sp], label) in f.tputs.into_iter().zip(["", " + 1 fd each"]) {
        let (wl_bw, sp_bw) = (mib_per_s(tput_bytes, wl), mib_per_s(tput_bytes, sp));
        println!(
            "wl-bench: {:<44} {:>6.1} MiB/s socketpair {:>6.1} MiB/s ratio {:.3}",
            format!("{TPUT_BYTES}-byte SENDs{label}, median"),
            wl_bw,
            sp_bw,
            wl_bw / sp_bw
        );
    }
    let bytes = a.shm_mib << 20;
    let shm_bw = mib_per_s(bytes, f.write_ns + f.read_ns);
    let guest_bw = mib_per_s(bytes, f.guest_copy_ns);
    let l1_bw = mib_per_s(bytes, f.l1_copy_ns);
    let private_bw = mib_per_s(bytes, f.private_ns.0 + f.private_ns.1);
    println!(
        "wl-bench: {:<44} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9}",
        format!("{} MiB, best of {} (MiB/s)", a.shm_mib, a.reps),
        "shm g->g",
        "guest memcpy",
        "guest private",
        "L1 memcpy",
        "/guest",
        "/private",
        "/L1"
    );
    println!(
        "wl-bench: {:<44} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {:>9.3} {:>9.3} {:>9.3}",
        "bandwidth",
        shm_bw,
        guest_bw,
        private_bw,
        l1_bw,
        shm_bw / guest_bw,
        shm_bw / private_bw,
        shm_bw / l1_bw
    );
    println!(
        "wl-bench: guest private: the writer fills a private {} MiB buffer in {} ns ({:.1} MiB/s) and reads it back in {} ns ({:.1} MiB/s), the same code as for the shared buffer",
        a.shm_mib,
        f.private_ns.0,
        mib_per_s(bytes, f.private_ns.0),
        f.private_ns.1,
        mib_per_s(bytes, f.private_ns.1)
    );
    println!(
        "wl-bench: shm: writer fill {} ns ({:.1} MiB/s), reader read {} ns ({:.1} MiB/s); guest memcpy {} ns; L1 memcpy {} ns",
        f.write_ns,
        mib_per_s(bytes, f.write_ns),
        f.read_ns,
        mib_per_s(bytes, f.read_ns),
        f.guest_copy_ns,
        f.l1_copy_ns
    );
    println!(
        "wl-bench: ratios: for times, virtio_wl / peer (below 1 is faster); for bandwidth, the fraction of the peer's reached"
    );
    let (plain, fd) = r.wl.first().copied().unwrap_or_default();
    let vsock_keys = r
        .vsock_paired
        .first()
        .copied()
        .flatten()
        .map(|(p, f)| format!("rtt_ratio_vs_vsock={p:.2} fd_rtt_ratio_vs_vsock={f:.2} "))
        .unwrap_or_default();
    println!(
        "BENCH wl {vsock_keys}shm_bw_ratio_vs_guest_memcpy={:.3} shm_bw_ratio_vs_guest_private={:.3} \
         rtt_ratio_vs_socketpair={:.2} fd_rtt_ratio_vs_socketpair={:.2} shm_bw_ratio_vs_memcpy={:.3}",
        shm_bw / guest_bw,
        shm_bw / private_bw,
        ratio(plain, r.socketpair),
        ratio(fd, r.socketpair_fd),
        shm_bw / l1_bw
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratio_is_the_median_of_per_batch_ratios() {
        // The load drops after two batches: the ratio of medians (4000/1400 = 2.9) would say
        // virtio_wl is far slower; batch by batch it is 1.1-1.4x.
        let wl = [4700, 4100, 3800, 1600, 1400];
        let vs = [3500, 3700, 1100, 1400, 1130];
        let r = paired_ratio(&wl, &vs).unwrap();
        assert!((r - 1400.0 / 1130.0).abs() < 1e-9, "{r}");
        assert_eq!(paired_ratio(&[], &[]), None);
        assert_eq!(paired_ratio(&[10], &[0]), Some(10.0));
    }
}
