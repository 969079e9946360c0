//! Runs inside a Bulkhead host (L1) for `bulkhead-rootfs bench vmm`: boots the same kernel and
//! initramfs under bulkhead-vmm and under QEMU (`-M microvm -accel kvm`), interleaved, and
//! measures for each boot:
//!
//! - wall: process start to the guest init's first line (`started, uptime U s`) on the
//!   serial console;
//! - the guest's uptime U in that line (CLOCK_BOOTTIME: counts from the guest kernel's clock
//!   start, early in its setup), and wall − U: the VMM's own part (process start, setup,
//!   kernel load, the guest's decompressor and early setup before its clock starts);
//! - for bulkhead-vmm, exec → first KVM_RUN (the VMM logs its CLOCK_MONOTONIC then);
//! - the VMM process's peak resident memory outside guest RAM (smaps, every 20 ms);
//! - what the boot cost the host: the VMM's CPU time and page faults, transparent huge pages
//!   and compaction stalls (`/proc/vmstat`), KVM's counters at the marker (exits, port I/O
//!   and MMIO exits, NPT faults fixed, pages mapped 4 KiB / 2 MiB), and the time from the
//!   guest's power-off line to the process's exit (tearing the VM down).
//!
//! Prints each boot, a table of medians and ranges, and one `BENCH vmm …` line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bulkhead_rootfs::bench::probe::{
    delta, ensure_debugfs, kvm_counters, median_min_max, monotonic_now,
    process_rss_outside_guest_kib, vmstat, ChildUsage,
};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Boot-time and memory benchmark of bulkhead-vmm against QEMU microvm")]
struct Args {
    #[arg(long)]
    kernel: String,
    #[arg(long)]
    initramfs: String,
    #[arg(long, default_value = "/bin/bulkhead-vmm")]
    vmm: String,
    /// Another bulkhead-vmm build measured in the same run, as NAME=PATH (repeatable): a
    /// before/after comparison of a change in one boot.
    #[arg(long = "also-vmm", value_name = "NAME=PATH")]
    also_vmm: Vec<String>,
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: String,
    /// Boots per VMM.
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Guest memory in MiB (every VMM).
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// The guest console line that marks "the guest's init is running"; its uptime follows.
    #[arg(long, default_value = "bulkhead-guest-init: started")]
    marker: String,
}

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// What the VMM logs at its first KVM_RUN.
const FIRST_RUN: &str = "first KVM_RUN at ";
/// What the VMM logs when its setup is done: `set up in T ms (steps) from CLOCK_MONOTONIC S s`.
const SET_UP: &str = "set up in ";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bulkhead,
    Qemu,
}

struct Peer {
    name: String,
    kind: Kind,
    path: String,
}

/// One boot.
#[derive(Default)]
struct Run {
    wall: Option<Duration>,
    uptime: Option<Duration>,
    /// Process start → first KVM_RUN (bulkhead-vmm only).
    first_run: Option<Duration>,
    /// Process start → the VMM's `main`, and its setup steps (bulkhead-vmm only).
    to_main: Option<Duration>,
    setup: String,
    peak_rss_kib: u64,
    /// The guest's power-off line → the process has exited (tearing the VM down).
    exit: Option<Duration>,
    usage: ChildUsage,
    vmstat: BTreeMap<String, u64>,
    kvm: BTreeMap<String, u64>,
}

impl Run {
    fn own(&self) -> Option<Duration> {
        Some(self.wall?.saturating_sub(self.uptime?))
    }
}

/// The uptime in a marker line: `… started, uptime 2.345 s`.
fn parse_uptime(line: &str) -> Option<Duration> {
    let rest = line.split("uptime ").nth(1)?;
    let secs: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// The CLOCK_MONOTONIC time after `marker` in a VMM log line.
fn parse_monotonic(line: &str, marker: &str) -> Option<Duration> {
    let rest = line.split(marker).nth(1)?;
    let rest = rest.split("CLOCK_MONOTONIC ").nth(1)?;
    let secs: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

/// The CLOCK_MONOTONIC time in the VMM's first-KVM_RUN log line.
fn parse_first_run(line: &str) -> Option<Duration> {
    parse_monotonic(line, FIRST_RUN)
}

/// The setup line: when `run` began and the steps (`set up in … ms (…)`).
fn parse_setup(line: &str) -> Option<(Duration, String)> {
    let start = parse_monotonic(line, SET_UP)?;
    let text = line.split(SET_UP).nth(1)?.split(" from ").next()?;
    Some((start, text.to_string()))
}

fn command(p: &Peer, a: &Args) -> Command {
    let mem = format!("{}M", a.memory_mib);
    match p.kind {
        Kind::Bulkhead => {
            let mut c = Command::new(&p.path);
            c.args(["--kernel", &a.kernel, "--initramfs", &a.initramfs])
                .args(["--cmdline", CMDLINE, "--memory", &mem, "--vcpus", "1"])
                .args(["--serial-input", "false"]);
            c
        }
        Kind::Qemu => {
            let mut c = Command::new(&p.path);
            c.args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
                .args(["-m", &mem, "-smp", "1", "-nodefaults", "-no-user-config"])
                .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
                .args(["-kernel", &a.kernel, "-initrd", &a.initramfs])
                .args(["-append", CMDLINE]);
            c
        }
    }
}

fn run_once(p: &Peer, a: &Args) -> Run {
    let guest_bytes = a.memory_mib << 20;
    let mut cmd = command(p, a);
    let usage_before = ChildUsage::now();
    let vm_before = vmstat();
    let start_mono = monotonic_now();
    let start = Instant::now();
    let spawned = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if p.kind == Kind::Bulkhead {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            println!("bench: {}: cannot start: {e}", p.name);
            return Run::default();
        }
    };
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = process_rss_outside_guest_kib(pid, guest_bytes) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The VMM's log: its setup and its first KVM_RUN.
    let (first_tx, first_rx) = mpsc::channel();
    let (setup_tx, setup_rx) = mpsc::channel();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Some(t) = parse_first_run(&line) {
                    let _ = first_tx.send(t);
                }
                if let Some(s) = parse_setup(&line) {
                    let _ = setup_tx.send(s);
                }
            }
        });
    }
    let mut run = Run::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if run.wall.is_none() && line.contains(&a.marker) {
                run.wall = Some(start.elapsed());
                run.uptime = parse_uptime(&line);
                run.kvm = kvm_counters();
            }
            if line.contains("reboot: Power down") || start.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
    }
    // Give the VMM a moment to exit on its own after the guest powered off, then make sure.
    let powered_off = Instant::now();
    while powered_off.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(_)) = child.try_wait() {
            run.exit = Some(powered_off.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    run.first_run = first_rx
        .try_recv()
        .ok()
        .map(|t: Duration| t.saturating_sub(start_mono));
    if let Ok((main, steps)) = setup_rx.try_recv() {
        run.to_main = Some(main.saturating_sub(start_mono));
        run.setup = steps;
    }
    run.peak_rss_kib = peak.load(Ordering::Relaxed);
    run.usage = ChildUsage::now().since(&usage_before);
    let vm_after = vmstat();
    run.vmstat = [
        "thp_fault_alloc",
        "thp_fault_fallback",
        "compact_stall",
        "pgfault",
    ]
    .iter()
    .map(|k| (k.to_string(), delta(&vm_before, &vm_after, k)))
    .collect();
    run
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.0}", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "-".into())
}

fn counter(m: &BTreeMap<String, u64>, k: &str) -> String {
    m.get(k)
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_run(round: u32, order: usize, p: &Peer, r: &Run) {
    println!(
        "bench: round {} #{} {:<14} wall {:>6} ms  uptime {:>6} ms  own {:>6} ms  exec->KVM_RUN {:>5} ms  rss+ {:>5.1} MiB",
        round + 1,
        order + 1,
        p.name,
        ms(r.wall),
        ms(r.uptime),
        ms(r.own()),
        ms(r.first_run),
        r.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "bench:     {:<14} cpu {:>6.0} ms  minflt {:>6}  thp {}/{} fallback  compact_stall {}  exit {} ms  kvm exits {} (io {} mmio {}) pf_fixed {} pages_4k {} pages_2m {}",
        p.name,
        r.usage.cpu.as_secs_f64() * 1e3,
        r.usage.minflt,
        counter(&r.vmstat, "thp_fault_alloc"),
        counter(&r.vmstat, "thp_fault_fallback"),
        counter(&r.vmstat, "compact_stall"),
        ms(r.exit),
        counter(&r.kvm, "exits"),
        counter(&r.kvm, "io_exits"),
        counter(&r.kvm, "mmio_exits"),
        counter(&r.kvm, "pf_fixed"),
        counter(&r.kvm, "pages_4k"),
        counter(&r.kvm, "pages_2m"),
    );
    if r.to_main.is_some() {
        println!(
            "bench:     {:<14} exec->main {} ms, set up in {}",
            p.name,
            ms(r.to_main),
            r.setup
        );
    }
}

/// Median and range of one figure over runs, in ms.
fn stat(runs: &[Run], f: impl Fn(&Run) -> Option<Duration>) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|r| f(r).map(|d| d.as_secs_f64() * 1e3))
        .collect();
    median_min_max(&v)
}

fn cell(s: Option<(f64, f64, f64)>) -> String {
    s.map(|(m, lo, hi)| format!("{m:.0} ({lo:.0}-{hi:.0})"))
        .unwrap_or_else(|| "-".into())
}

fn median_rss_mib(runs: &[Run]) -> Option<f64> {
    let v: Vec<f64> = runs
        .iter()
        .map(|r| r.peak_rss_kib as f64 / 1024.0)
        .collect();
    median_min_max(&v).map(|(m, _, _)| m)
}

fn peers(a: &Args) -> Result<Vec<Peer>, String> {
    let mut peers = vec![Peer {
        name: "bulkhead-vmm".into(),
        kind: Kind::Bulkhead,
        path: a.vmm.clone(),
    }];
    for spec in &a.also_vmm {
        let (name, path) = spec
            .split_once('=')
            .ok_or_else(|| format!("--also-vmm {spec:?}: expected NAME=PATH"))?;
        peers.push(Peer {
            name: name.into(),
            kind: Kind::Bulkhead,
            path: path.into(),
        });
    }
    peers.push(Peer {
        name: "qemu-microvm".into(),
        kind: Kind::Qemu,
        path: a.qemu.clone(),
    });
    Ok(peers)
}

fn main() -> ExitCode {
    let a = Args::parse();
    let peers = match peers(&a) {
        Ok(p) => p,
        Err(e) => {
            println!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    if !ensure_debugfs() {
        println!("bench: KVM's debugfs counters are not available; those columns stay empty");
    }
    let mut results: Vec<Vec<Run>> = peers.iter().map(|_| Vec::new()).collect();
    for round in 0..a.runs {
        // Interleaved, and each round starts with the next VMM, so that drift on a noisy
        // machine and whatever one boot leaves behind hit every VMM alike.
        for order in 0..peers.len() {
            let i = (order + round as usize) % peers.len();
            let r = run_once(&peers[i], &a);
            print_run(round, order, &peers[i], &r);
            results[i].push(r);
        }
    }
    println!(
        "bench: {} boots each, {} MiB, 1 vCPU; median (min-max) in ms",
        a.runs, a.memory_mib
    );
    println!(
        "bench: {:<14} {:>20} {:>20} {:>20} {:>20} {:>10}",
        "vmm", "wall to init", "guest uptime", "wall - uptime", "exec -> KVM_RUN", "rss+ MiB"
    );
    for (p, runs) in peers.iter().zip(&results) {
        println!(
            "bench: {:<14} {:>20} {:>20} {:>20} {:>20} {:>10}",
            p.name,
            cell(stat(runs, |r| r.wall)),
            cell(stat(runs, |r| r.uptime)),
            cell(stat(runs, Run::own)),
            cell(stat(runs, |r| r.first_run)),
            median_rss_mib(runs)
                .map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let ours = &results[0];
    let qemu = &results[peers.len() - 1];
    let med = |runs: &[Run], f: fn(&Run) -> Option<Duration>| stat(runs, f).map(|s| s.0);
    let figures = (
        med(ours, |r| r.wall),
        med(qemu, |r| r.wall),
        med(ours, Run::own),
        med(qemu, Run::own),
        med(ours, |r| r.first_run),
        median_rss_mib(ours),
        median_rss_mib(qemu),
    );
    match figures {
        (Some(o), Some(q), Some(oo), Some(qo), Some(e), Some(om), Some(qm)) if q > 0.0 => {
            println!(
                "BENCH vmm boot_ratio_vs_qemu={:.2} vmm_own_ms={oo:.0} qemu_own_ms={qo:.0} \
                 exec_to_run_ms={e:.0} own_ratio_vs_qemu={:.2} rss_overhead_mib={om:.1} \
                 qemu_rss_overhead_mib={qm:.1}",
                o / q,
                oo / qo.max(1.0)
            );
            ExitCode::SUCCESS
        }
        _ => {
            println!("bench: a VMM never reached the guest's init (or no uptime); no ratio");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_uptime_and_first_run_lines_parse() {
        assert_eq!(
            parse_uptime("bulkhead-guest-init: started, uptime 2.345 s"),
            Some(Duration::from_millis(2345))
        );
        assert_eq!(parse_uptime("bulkhead-guest-init: started"), None);
        assert_eq!(
            parse_first_run(
                "bulkhead-vmm: INFO: vCPU 0: first KVM_RUN at CLOCK_MONOTONIC 12.500000000 s"
            ),
            Some(Duration::from_millis(12500))
        );
        assert_eq!(parse_first_run("bulkhead-vmm: INFO: kernel loaded"), None);
        assert_eq!(
            parse_setup(
                "bulkhead-vmm: INFO: set up in 12.5 ms (kvm 0.1, vm 2.0) from CLOCK_MONOTONIC 3.25 s"
            ),
            Some((Duration::from_millis(3250), "12.5 ms (kvm 0.1, vm 2.0)".into()))
        );
    }

    #[test]
    fn also_vmm_needs_a_name_and_a_path() {
        let a = Args::parse_from([
            "b",
            "--kernel",
            "k",
            "--initramfs",
            "i",
            "--also-vmm",
            "before=/bin/old",
        ]);
        let p = peers(&a).unwrap();
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bulkhead-vmm", "before", "qemu-microvm"]);
        let bad = Args::parse_from(["b", "--kernel", "k", "--initramfs", "i", "--also-vmm", "x"]);
        assert!(peers(&bad).is_err());
    }
}
