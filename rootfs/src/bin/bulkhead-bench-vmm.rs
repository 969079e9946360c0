//! Runs inside a Bulkhead host (L1) for `bulkhead-rootfs bench vmm`: boots the same kernel and
//! initramfs under bulkhead-vmm and under QEMU (`-M microvm -accel kvm`) several times each,
//! and measures (1) the time from process start to the guest init's first line and (2) the
//! VMM process's peak resident memory outside guest RAM, sampled from /proc/<pid>/smaps.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: String,
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Guest memory in MiB (both VMMs).
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// The guest console line that marks "the guest's init is running".
    #[arg(long, default_value = "bulkhead-guest-init: started")]
    marker: String,
}

const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Resident KiB of a process outside its guest-RAM mapping (any mapping at least 3/4 of the
/// guest memory size is taken to be guest RAM).
fn rss_outside_guest_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut in_guest, mut cur_is_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                cur_is_guest = hi.saturating_sub(lo) >= guest_bytes / 4 * 3;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            total += kib;
            if cur_is_guest {
                in_guest += kib;
            }
        }
    }
    Some(total - in_guest)
}

struct Run {
    to_marker: Option<Duration>,
    peak_rss_kib: u64,
}

fn run_once(name: &str, mut cmd: Command, marker: &str, guest_bytes: u64) -> Run {
    let start = Instant::now();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            println!("bench: {name}: cannot start: {e}");
            return Run {
                to_marker: None,
                peak_rss_kib: 0,
            };
        }
    };
    let pid = child.id();
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(kib) = rss_outside_guest_kib(pid, guest_bytes) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut to_marker = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if to_marker.is_none() && line.contains(marker) {
                to_marker = Some(start.elapsed());
            }
            if line.contains("reboot: Power down") || start.elapsed() > Duration::from_secs(300) {
                break;
            }
        }
    }
    // Give the VMM a moment to exit on its own after the guest powered off, then make sure.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    Run {
        to_marker,
        peak_rss_kib: peak.load(Ordering::Relaxed),
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn main() -> ExitCode {
    let a = Args::parse();
    let guest_bytes = a.memory_mib << 20;
    let mem = format!("{}M", a.memory_mib);
    let mut results: Vec<(&str, Vec<Run>)> =
        vec![("bulkhead-vmm", Vec::new()), ("qemu-microvm", Vec::new())];
    for i in 0..a.runs {
        // Alternate so that drift on a noisy machine hits both alike.
        for (name, runs) in results.iter_mut() {
            let cmd = if *name == "bulkhead-vmm" {
                let mut c = Command::new(&a.vmm);
                c.args([
                    "--kernel",
                    &a.kernel,
                    "--initramfs",
                    &a.initramfs,
                    "--cmdline",
                    CMDLINE,
                ])
                .args(["--memory", &mem, "--vcpus", "1"]);
                c
            } else {
                let mut c = Command::new(&a.qemu);
                c.args([
                    "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-m", &mem, "-smp", "1",
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-serial",
                    "stdio",
                ])
                .args([
                    "-no-reboot",
                    "-kernel",
                    &a.kernel,
                    "-initrd",
                    &a.initramfs,
                    "-append",
                    CMDLINE,
                ]);
                c
            };
            let r = run_once(name, cmd, &a.marker, guest_bytes);
            println!(
                "bench: run {} {:<13} to init {:>8} ms  peak rss beyond guest memory {:>7.1} MiB",
                i + 1,
                name,
                r.to_marker
                    .map(|d| d.as_millis().to_string())
                    .unwrap_or_else(|| "-".into()),
                r.peak_rss_kib as f64 / 1024.0
            );
            runs.push(r);
        }
    }
    let summary = |runs: &Vec<Run>| {
        let t = median(
            runs.iter()
                .filter_map(|r| r.to_marker.map(|d| d.as_secs_f64()))
                .collect(),
        );
        let m = median(
            runs.iter()
                .map(|r| r.peak_rss_kib as f64 / 1024.0)
                .collect(),
        );
        (t, m)
    };
    let (ours_t, ours_m) = summary(&results[0].1);
    let (qemu_t, qemu_m) = summary(&results[1].1);
    println!(
        "bench: {:<13} {:>16} {:>28}",
        "vmm", "median to init", "median rss beyond guest"
    );
    for (name, t, m) in [
        ("bulkhead-vmm", ours_t, ours_m),
        ("qemu-microvm", qemu_t, qemu_m),
    ] {
        println!(
            "bench: {:<13} {:>14} s {:>24} MiB",
            name,
            t.map(|t| format!("{t:.2}")).unwrap_or_else(|| "-".into()),
            m.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into())
        );
    }
    match (ours_t, qemu_t, ours_m, qemu_m) {
        (Some(o), Some(q), Some(om), Some(qm)) if q > 0.0 => {
            println!(
                "BENCH vmm boot_ratio_vs_qemu={:.2} rss_overhead_mib={:.1} qemu_rss_overhead_mib={:.1}",
                o / q,
                om,
                qm
            );
            ExitCode::SUCCESS
        }
        _ => {
            println!("bench: a VMM never reached the guest's init; no ratio");
            ExitCode::from(1)
        }
    }
}
