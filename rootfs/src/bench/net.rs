//! `bulkhead-rootfs bench net`: one L1 boot of `rootfs/examples/netvm` (net-vm owning a NIC
//! by VFIO, one app VM, the test peer in its own network namespace on the other NIC of the
//! same closed QEMU hub). The peer measures, from the emulated host, TCP round trips (a
//! one-byte ping-pong) and the throughput of a 10 s stream: from the app VM (virtio-net → its
//! VMM → the ring → netd → TAP → bridge → the NIC) and from net-vm itself (bridge → the NIC),
//! in turn, [`ROUNDS`] times; then from the app VM with virtio_net's default TX NAPI. Prints a
//! table and ends with `BENCH net tcp_ratio_vs_netvm=<x> rtt_ratio_vs_netvm=<x>`, the
//! medians of the rounds' ratios (throughput: app / net-vm, higher is better; round trip:
//! app / net-vm, lower is better).

use std::path::Path;
use std::time::Duration;

use super::BenchError;
use crate::image::build_system_image;
use crate::kernel::plan::SystemKernels;
use crate::kernel::Kernel;
use crate::qemu::{Machine, Outcome, QemuConfig};

/// One measurement the peer printed.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub rtt_us_median: f64,
    pub rtt_us_p90: f64,
    pub mbit_s: f64,
    pub bytes: u64,
}

/// Parses the peer's `measured <label> from <ip>: key=value …` line (after `peer: `) for
/// `label`.
pub fn parse_measured(line: &str, label: &str) -> Option<Measured> {
    let rest = line.strip_prefix(&format!("measured {label} from "))?;
    let (_, kv) = rest.split_once(": ")?;
    let get = |k: &str| {
        kv.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    Some(Measured {
        rtt_us_median: get("rtt_us_median")?.parse().ok()?,
        rtt_us_p90: get("rtt_us_p90")?.parse().ok()?,
        mbit_s: get("tcp_mbit_s")?.parse().ok()?,
        bytes: get("bytes")?.parse().ok()?,
    })
}

/// Rounds of the comparison: app-vm and net-vm measured in turn (`app-1`, `net-vm-1`,
/// `app-2`, …; the labels in `rootfs/examples/netvm`), so that a change in the machine's
/// load between measurements moves both sides of a round alike.
pub const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The table and the BENCH line: `rounds` of (app-vm as the example ships it, net-vm), the
/// ratios the median of the rounds' ratios; `app_napi_tx`, app-vm with virtio_net's default
/// TX NAPI, is a row for comparison.
pub fn report(rounds: &[(Measured, Measured)], app_napi_tx: Option<&Measured>) -> Vec<String> {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let row = |what: &str, m: &Measured| {
        format!(
            "{what:<46} {:>10.2} {:>12.0} {:>12.0} {:>12}",
            m.mbit_s,
            m.rtt_us_median,
            m.rtt_us_p90,
            m.bytes / (1024 * 1024)
        )
    };
    let mut out = vec![format!(
        "{:<46} {:>10} {:>12} {:>12} {:>12}",
        "TCP to the peer (measured by the peer)", "Mbit/s", "RTT µs p50", "RTT µs p90", "MiB sent"
    )];
    let mut tcp = Vec::new();
    let mut rtt = Vec::new();
    for (i, (app, netvm)) in rounds.iter().enumerate() {
        let n = i + 1;
        out.push(row(
            &format!("{n}: app VM → VMM → ring → netd → bridge → NIC"),
            app,
        ));
        out.push(row(&format!("{n}: net-vm itself → bridge → NIC"), netvm));
        tcp.push(ratio(app.mbit_s, netvm.mbit_s));
        rtt.push(ratio(app.rtt_us_median, netvm.rtt_us_median));
    }
    if let Some(m) = app_napi_tx {
        out.push(row("app VM again, virtio_net's TX NAPI on", m));
    }
    out.push(
        "(in this order, one at a time; 10 s streams, 200 one-byte round trips each; under \
         nested emulation)"
            .to_string(),
    );
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    out.push(format!(
        "app VM / net-vm by round: throughput {}, round trip {}",
        list(&tcp),
        list(&rtt)
    ));
    if let (Some(m), Some((_, netvm))) = (app_napi_tx, rounds.last()) {
        out.push(format!(
            "app VM with TX NAPI on / net-vm of the last round: throughput {:.2}, round trip {:.2}",
            ratio(m.mbit_s, netvm.mbit_s),
            ratio(m.rtt_us_median, netvm.rtt_us_median)
        ));
    }
    out.push(format!(
        "BENCH net tcp_ratio_vs_netvm={:.2} rtt_ratio_vs_netvm={:.2}",
        median(tcp),
        median(rtt)
    ));
    out
}

/// Builds `rootfs/examples/netvm`, boots it with the net hub and reports.
pub fn bench_net(
    kernel: &Kernel,
    cache_dir: &Path,
    workspace: &Path,
) -> Result<Vec<String>, BenchError> {
    let src = workspace.join("rootfs/examples/netvm");
    let dir = workspace.join("target/bulkhead/bench-net");
    let image = dir.join("host.cpio.gz");
    let kernels = SystemKernels::all(kernel.clone());
    let disks = build_system_image(&kernels, cache_dir, workspace, &src, &image)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut cfg = QemuConfig::host(&kernel.vmlinuz, &image, crate::HOST_CMDLINE);
    cfg.disks = disks;
    cfg.net_hub = true;
    // BULKHEAD_TEST_ECHO=1 streams the console, as in the tests.
    let echo = std::env::var_os("BULKHEAD_TEST_ECHO").is_some();
    let mut m = Machine::spawn(&cfg, echo).map_err(|e| BenchError::Run(e.to_string()))?;
    let end = m.wait_end(Duration::from_secs(2400));
    // The whole console, whatever the end, for reading after the run.
    let console = dir.join("console.txt");
    match std::fs::write(&console, m.lines().join("\n")) {
        Ok(()) => eprintln!("the console is in {}", console.display()),
        Err(e) => eprintln!("{}: {e}", console.display()),
    }
    let end = end.map_err(|e| BenchError::Run(e.to_string()))?;
    if end != Outcome::PowerOff {
        return Err(BenchError::Run(format!(
            "the bench host ended with {end:?}\n{}",
            m.context()
        )));
    }
    let find = |label: &str| {
        m.lines().iter().find_map(|l| {
            l.strip_prefix("peer: ")
                .and_then(|r| parse_measured(r, label))
        })
    };
    let mut rounds = Vec::new();
    for n in 1..=ROUNDS {
        match (find(&format!("app-{n}")), find(&format!("net-vm-{n}"))) {
            (Some(a), Some(v)) => rounds.push((a, v)),
            _ => {
                return Err(BenchError::Run(format!(
                    "the peer did not measure both sides of round {n}\n{}",
                    m.context()
                )))
            }
        }
    }
    Ok(report(&rounds, find("app-napi-tx").as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_lines_parse_and_the_report_ends_with_the_bench_line() {
        let app = parse_measured(
            "measured app from 198.51.100.10: rtt_us_median=900 rtt_us_p90=1500 tcp_mbit_s=40.00 bytes=52428800 seconds=10.00",
            "app",
        )
        .unwrap();
        let netvm = parse_measured(
            "measured net-vm from 198.51.100.2: rtt_us_median=300 rtt_us_p90=400 tcp_mbit_s=80.00 bytes=104857600 seconds=10.00",
            "net-vm",
        )
        .unwrap();
        assert!(parse_measured("measured app from 1.2.3.4: rtt_us_median=x", "app").is_none());
        assert!(parse_measured(
            "measured net-vm from 198.51.100.2: rtt_us_median=1 rtt_us_p90=1 tcp_mbit_s=1 bytes=1",
            "app"
        )
        .is_none());
        let slow = Measured {
            mbit_s: 20.0,
            rtt_us_median: 600.0,
            ..netvm.clone()
        };
        let rounds = [
            (app.clone(), netvm.clone()),
            (app.clone(), slow.clone()),
            (slow.clone(), netvm.clone()),
        ];
        // Ratios by round: 0.50, 2.00, 0.25 (throughput); 3.00, 1.50, 2.00 (round trip).
        let r = report(&rounds, None);
        assert_eq!(
            r.last().unwrap(),
            "BENCH net tcp_ratio_vs_netvm=0.50 rtt_ratio_vs_netvm=2.00"
        );
        assert!(
            r[1].starts_with("1: app VM") && r[1].contains("40.00"),
            "{}",
            r[1]
        );
        assert!(r
            .iter()
            .any(|l| l.ends_with("throughput 0.50 2.00 0.25, round trip 3.00 1.50 2.00")));
        // The comparison row does not change the BENCH line, which stays last.
        let napi = parse_measured(
            "measured app-napi-tx from 198.51.100.10: rtt_us_median=1200 rtt_us_p90=2000 tcp_mbit_s=20.00 bytes=1 seconds=10.00",
            "app-napi-tx",
        )
        .unwrap();
        let r2 = report(&rounds, Some(&napi));
        assert_eq!(r2.last(), r.last());
        assert!(r2
            .iter()
            .any(|l| l.contains("TX NAPI on") && l.contains("20.00")));
        assert!(r2
            .iter()
            .any(|l| l.ends_with("throughput 0.25, round trip 4.00")));
        // An even number of rounds: the mean of the middle two.
        let r = report(&rounds[..2], None);
        assert_eq!(
            r.last().unwrap(),
            "BENCH net tcp_ratio_vs_netvm=1.25 rtt_ratio_vs_netvm=2.25"
        );
    }
}
