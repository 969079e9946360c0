//! `bulkhead-hub bench`: messages with one fd, through a real hub process vs a direct
//! socketpair between the same two processes, measured in the same run.
//!
//! Three processes: this one (the sender, VM "bench-a"), a forked hub and a forked receiver
//! (VM "bench-b", which provides the service `bench`). The sender pushes `messages` frames,
//! each carrying the same sealed memfd, alternately over a direct socketpair to the receiver
//! and through the hub, three rounds each (the median rate of each path is reported); the
//! receiver says "done" on a side socket after each run. Latency is one message at a time:
//! the sender stamps CLOCK_MONOTONIC into the data, the receiver records arrival minus
//! stamp and acks on the side socket before the next one.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

use bulkhead_policy::{Rights, RootDir};
use serde::{Deserialize, Serialize};

use crate::channel::{Channel, ChannelError};
use crate::classify::{F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SHRINK};
use crate::hub::budget::Budgets;
use crate::hub::client::{ClientError, HubConn, Incoming};
use crate::hub::protocol::{HubEvent, Refusal, VmRequest};
use crate::hub::{Hub, HubConfig};

/// Bench parameters.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Messages per throughput run.
    pub messages: u32,
    /// Latency samples per path.
    pub samples: u32,
}

/// Results.
#[derive(Debug, Clone, Default)]
pub struct BenchResult {
    /// Messages per second, direct.
    pub direct_rate: f64,
    /// Messages per second, through the hub.
    pub hub_rate: f64,
    /// Direct latency p50/p99 (µs).
    pub direct_p50_us: f64,
    /// Direct p99.
    pub direct_p99_us: f64,
    /// Hub p50.
    pub hub_p50_us: f64,
    /// Hub p99.
    pub hub_p99_us: f64,
}

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setup or I/O failed.
    #[error("bench: {0}")]
    Failed(String),
}

fn fail<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BenchError {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

#[derive(Serialize, Deserialize)]
enum Side {
    Ready,
    Done,
    Ack,
    Latencies(Vec<u32>),
}

fn mono_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid; clock_gettime writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and pointer to a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

fn sealed_memfd() -> Result<OwnedFd, BenchError> {
    // SAFETY: NUL-terminated name, valid flags; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(BenchError::Failed("memfd_create failed".into()));
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Mode 0644, as every memfd the hub passes (it refuses group/other-writable ones).
    nix::sys::stat::fchmod(
        &fd,
        nix::sys::stat::Mode::from_bits_truncate(crate::hub::memfd_server::MEMFD_MODE),
    )
    .map_err(fail("fchmod"))?;
    nix::unistd::ftruncate(&fd, 4096).map_err(fail("ftruncate"))?;
    // SAFETY: F_ADD_SEALS with an int on our own memfd.
    if unsafe { libc::fcntl(fd.as_raw_fd(), F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK) } < 0 {
        return Err(BenchError::Failed("F_ADD_SEALS failed".into()));
    }
    Ok(fd)
}

/// Throughput runs per path.
pub const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted.get(idx).copied().unwrap_or(0)) / 1000.0
}

const POLICY: &str = "version 1\n\
grant bench-b provide bench c2s=memfd:rw+transfer+dup s2c=none max-fds=1\n\
grant bench-a connect bench@bench-b\n\
grant @any quota shm=64MiB shm-count=256 vfds=256\n";

/// Runs the benchmark (forks the hub and the receiver; call from a single-threaded process).
pub fn run(opts: BenchOptions) -> Result<BenchResult, BenchError> {
    let dir = std::env::temp_dir().join(format!("bulkhead-hub-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(fail("policy dir"))?;
    std::fs::write(dir.join("10-bench.policy"), POLICY).map_err(fail("policy file"))?;
    let result = run_in(&dir, opts);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &std::path::Path, opts: BenchOptions) -> Result<BenchResult, BenchError> {
    let (a_vmm, a_hub) = Channel::pair().map_err(fail("socketpair"))?;
    let (b_vmm, b_hub) = Channel::pair().map_err(fail("socketpair"))?;
    let (direct_a, direct_b) = Channel::pair().map_err(fail("socketpair"))?;
    let (side_a, side_b) = Channel::pair().map_err(fail("socketpair"))?;

    let cfg = HubConfig {
        roots: RootDir::staging(dir),
        audit: Some(dir.join("audit.jsonl")),
        control_socket: None,
        exit_when_no_vms: true,
        budgets: Budgets::default(),
    };
    // SAFETY: the bench runs in a single-threaded process; the child only runs the hub loop
    // and exits.
    let hub_pid = match unsafe { nix::unistd::fork() }.map_err(fail("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop((a_vmm, b_vmm, direct_a, direct_b, side_a, side_b));
            let code = match Hub::new(
                cfg,
                vec![("bench-a".into(), a_hub), ("bench-b".into(), b_hub)],
            ) {
                Ok(mut hub) => i32::from(hub.run().is_err()),
                Err(_) => 1,
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((a_hub, b_hub));
    // SAFETY: as above; the receiver child only uses its sockets and exits.
    let recv_pid = match unsafe { nix::unistd::fork() }.map_err(fail("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop((a_vmm, direct_a, side_a));
            let code = i32::from(receiver(&b_vmm, &direct_b, &side_b, opts).is_err());
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((b_vmm, direct_b, side_b));
    let res = sender(&a_vmm, &direct_a, &side_a, opts);
    drop((a_vmm, direct_a, side_a));
    let _ = nix::sys::wait::waitpid(recv_pid, None);
    let _ = nix::sys::wait::waitpid(hub_pid, None);
    res
}

fn expect_side(side: &Channel) -> Result<Side, BenchError> {
    side.recv::<Side>()
        .map(|(m, _)| m)
        .map_err(fail("side channel"))
}

fn sender(
    vm: &Channel,
    direct: &Channel,
    side: &Channel,
    opts: BenchOptions,
) -> Result<BenchResult, BenchError> {
    let memfd = sealed_memfd()?;
    let one: [BorrowedFd<'_>; 1] = [memfd.as_fd()];
    // Wait until the receiver provides the service, then connect through the hub.
    match expect_side(side)? {
        Side::Ready => {}
        _ => return Err(BenchError::Failed("receiver not ready".into())),
    }
    let service =
        heapless::String::try_from("bench").map_err(|_| BenchError::Failed("name".into()))?;
    vm.send(
        &VmRequest::Connect {
            tag: 1,
            service,
            provider: None,
        },
        &[],
    )
    .map_err(fail("connect"))?;
    let (ev, mut fds) = vm.recv::<HubEvent>().map_err(fail("connect answer"))?;
    let conn = match (ev, fds.pop()) {
        (HubEvent::Connected { .. }, Some(fd)) => Channel::from_fd(fd),
        (other, _) => return Err(BenchError::Failed(format!("connect refused: {other:?}"))),
    };
    let mut conn = HubConn::from_fd(conn.into_fd()).map_err(fail("hub conn"))?;
    let rights = [(memfd.as_fd(), Rights::READ | Rights::MAP)];

    // Throughput: ROUNDS alternating runs of each path; the median of each is reported, so
    // one burst of load from elsewhere on the machine does not decide the ratio.
    let mut direct_rates = Vec::with_capacity(ROUNDS);
    let mut hub_rates = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..opts.messages {
            direct
                .send(&0u64.to_le_bytes().to_vec(), &one)
                .map_err(fail("direct send"))?;
        }
        expect_side(side)?;
        direct_rates.push(f64::from(opts.messages) / t.elapsed().as_secs_f64());

        let t = Instant::now();
        pipeline(&mut conn, &rights, opts.messages)?;
        expect_side(side)?;
        hub_rates.push(f64::from(opts.messages) / t.elapsed().as_secs_f64());
    }
    let direct_rate = median(&mut direct_rates);
    let hub_rate = median(&mut hub_rates);

    // Latency, direct then hub.
    for _ in 0..opts.samples {
        direct
            .send(&mono_ns().to_le_bytes().to_vec(), &one)
            .map_err(fail("direct send"))?;
        expect_side(side)?;
    }
    for _ in 0..opts.samples {
        let stamp = mono_ns().to_le_bytes();
        let seq = loop {
            match conn.try_send(&stamp, &rights) {
                Ok(seq) => break seq,
                Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                    wait(conn.as_fd(), libc::POLLOUT)
                }
                Err(e) => return Err(BenchError::Failed(format!("hub send: {e}"))),
            }
        };
        expect_side(side)?;
        // Its verdict (not part of the one-way latency).
        loop {
            match conn.try_recv() {
                Ok(Incoming::Accepted { seq: s }) if s == seq => break,
                Ok(Incoming::Ready) => {}
                Ok(other) => return Err(BenchError::Failed(format!("verdict: {other:?}"))),
                Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                    wait(conn.as_fd(), libc::POLLIN)
                }
                Err(e) => return Err(BenchError::Failed(format!("verdict: {e}"))),
            }
        }
    }
    let lat = |_: ()| -> Result<Vec<u32>, BenchError> {
        match expect_side(side)? {
            Side::Latencies(mut v) => {
                v.sort_unstable();
                Ok(v)
            }
            _ => Err(BenchError::Failed("expected latencies".into())),
        }
    };
    let d = lat(())?;
    let h = lat(())?;
    Ok(BenchResult {
        direct_rate,
        hub_rate,
        direct_p50_us: percentile(&d, 0.5),
        direct_p99_us: percentile(&d, 0.99),
        hub_p50_us: percentile(&h, 0.5),
        hub_p99_us: percentile(&h, 0.99),
    })
}

fn receiver(
    vm: &Channel,
    direct: &Channel,
    side: &Channel,
    opts: BenchOptions,
) -> Result<(), BenchError> {
    let service =
        heapless::String::try_from("bench").map_err(|_| BenchError::Failed("name".into()))?;
    vm.send(&VmRequest::Provide { tag: 1, service }, &[])
        .map_err(fail("provide"))?;
    match vm.recv::<HubEvent>().map_err(fail("provide answer"))?.0 {
        HubEvent::Provided { .. } => {}
        other => return Err(BenchError::Failed(format!("provide refused: {other:?}"))),
    }
    side.send(&Side::Ready, &[]).map_err(fail("side"))?;
    let (ev, mut fds) = vm.recv::<HubEvent>().map_err(fail("accept"))?;
    let mut conn = match (ev, fds.pop()) {
        (HubEvent::Accept { .. }, Some(fd)) => HubConn::from_fd(fd).map_err(fail("hub conn"))?,
        (other, _) => return Err(BenchError::Failed(format!("no accept: {other:?}"))),
    };
    let recv_hub = |conn: &mut HubConn| -> Result<u64, BenchError> {
        loop {
            match conn.try_recv() {
                Ok(Incoming::Message { data, fds }) if fds.len() == 1 => return Ok(stamp(&data)),
                Ok(other) => return Err(BenchError::Failed(format!("unexpected {other:?}"))),
                Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                    wait(conn.as_fd(), libc::POLLIN)
                }
                Err(e) => return Err(BenchError::Failed(format!("hub recv: {e}"))),
            }
        }
    };
    let recv_direct = || -> Result<u64, BenchError> {
        let (data, fds) = direct.recv::<Vec<u8>>().map_err(fail("direct recv"))?;
        if fds.len() != 1 {
            return Err(BenchError::Failed("direct frame without its fd".into()));
        }
        Ok(stamp(&data))
    };
    for _ in 0..ROUNDS {
        for _ in 0..opts.messages {
            recv_direct()?;
        }
        side.send(&Side::Done, &[]).map_err(fail("side"))?;
        for _ in 0..opts.messages {
            recv_hub(&mut conn)?;
        }
        side.send(&Side::Done, &[]).map_err(fail("side"))?;
    }
    let mut d = Vec::new();
    for _ in 0..opts.samples {
        let s = recv_direct()?;
        d.push(u32::try_from(mono_ns().saturating_sub(s)).unwrap_or(u32::MAX));
        side.send(&Side::Ack, &[]).map_err(fail("side"))?;
    }
    let mut h = Vec::new();
    for _ in 0..opts.samples {
        let s = recv_hub(&mut conn)?;
        h.push(u32::try_from(mono_ns().saturating_sub(s)).unwrap_or(u32::MAX));
        side.send(&Side::Ack, &[]).map_err(fail("side"))?;
    }
    side.send(&Side::Latencies(d), &[]).map_err(fail("side"))?;
    side.send(&Side::Latencies(h), &[]).map_err(fail("side"))?;
    Ok(())
}

/// Most sends without a verdict yet (the way a guest's sends overlap: several vfds, several
/// VMs; one VMM's device waits for each).
const WINDOW: u32 = 256;

/// Sends `n` messages through the hub as fast as it takes them, each with one memfd,
/// reading verdicts as they come; a `Busy` one is sent again. Returns when `n` were
/// accepted.
fn pipeline(
    conn: &mut HubConn,
    fds: &[(BorrowedFd<'_>, Rights)],
    n: u32,
) -> Result<(), BenchError> {
    let stamp = 0u64.to_le_bytes();
    let (mut to_send, mut outstanding, mut accepted) = (n, 0u32, 0u32);
    while accepted < n {
        let mut progress = false;
        while to_send > 0 && outstanding < WINDOW {
            match conn.try_send(&stamp, fds) {
                Ok(_) => {
                    to_send -= 1;
                    outstanding += 1;
                    progress = true;
                }
                Err(ClientError::Channel(ChannelError::WouldBlock)) => break,
                Err(e) => return Err(BenchError::Failed(format!("hub send: {e}"))),
            }
        }
        loop {
            match conn.try_recv() {
                Ok(Incoming::Accepted { .. }) => {
                    accepted += 1;
                    outstanding = outstanding.saturating_sub(1);
                    progress = true;
                }
                Ok(Incoming::Refused {
                    error: Refusal::Busy,
                    ..
                }) => {
                    to_send += 1;
                    outstanding = outstanding.saturating_sub(1);
                    progress = true;
                }
                Ok(Incoming::Ready) => {}
                Ok(other) => return Err(BenchError::Failed(format!("verdict: {other:?}"))),
                Err(ClientError::Channel(ChannelError::WouldBlock)) => break,
                Err(e) => return Err(BenchError::Failed(format!("verdict: {e}"))),
            }
        }
        if !progress {
            let ev = if to_send > 0 && outstanding < WINDOW {
                libc::POLLIN | libc::POLLOUT
            } else {
                libc::POLLIN
            };
            wait(conn.as_fd(), ev);
        }
    }
    Ok(())
}

/// Waits (up to a second) for `events` on `fd`.
fn wait(fd: BorrowedFd<'_>, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, 1000) };
}

fn stamp(data: &[u8]) -> u64 {
    data.get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}

impl From<ChannelError> for BenchError {
    fn from(e: ChannelError) -> Self {
        BenchError::Failed(e.to_string())
    }
}
