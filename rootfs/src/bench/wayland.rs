//! `bulkhead-rootfs bench wayland`: one L1 boot of `rootfs/bench/wayland` (gui-vm with
//! weston, one app VM). `bulkhead-wl-shm-bench` commits 640x480 frames with full damage,
//! each after the previous frame's callback: first in the app VM through the app-side
//! proxy, the hub and the GUI-side proxy, then in gui-vm directly on weston's socket (the
//! peer). Prints a table (frames/s, bytes the app proxy copied per frame, its CPU) and ends
//! with `BENCH wayland fps_ratio_vs_local=<x> copied_bytes_per_frame=<n>`.

use std::path::Path;
use std::time::Duration;

use super::{write_file, BenchError};
use crate::image::build_system_image;
use crate::kernel::plan::SystemKernels;
use crate::kernel::Kernel;
use crate::qemu::{Machine, Outcome, QemuConfig};

/// One client's result line, `<label>: frames=N seconds=S fps=F [key=value…]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub fps: f64,
    pub frames: u64,
    pub copied_per_frame: Option<u64>,
    pub proxy_cpu_share: Option<f64>,
}

/// Parses what follows `<label>: ` in a result line.
pub fn parse_run(rest: &str) -> Option<Run> {
    let get = |k: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
    };
    Some(Run {
        fps: get("fps")?.parse().ok()?,
        frames: get("frames")?.parse().ok()?,
        copied_per_frame: get("copied_bytes_per_frame").and_then(|v| v.parse().ok()),
        proxy_cpu_share: get("proxy_cpu_share").and_then(|v| v.parse().ok()),
    })
}

/// The table and the BENCH line for the two runs.
pub fn report(proxy: &Run, local: &Run) -> Vec<String> {
    let copied = proxy.copied_per_frame.unwrap_or(0);
    let ratio = if local.fps > 0.0 {
        proxy.fps / local.fps
    } else {
        0.0
    };
    vec![
        format!(
            "{:<44} {:>9} {:>22} {:>14}",
            "640x480 shm, full damage, frame callbacks",
            "frames/s",
            "copied bytes/frame",
            "proxy CPU"
        ),
        format!(
            "{:<44} {:>9.1} {:>22} {:>14}",
            "app VM → app proxy → hub → gui proxy → weston",
            proxy.fps,
            copied,
            proxy
                .proxy_cpu_share
                .map(|c| format!("{:.0}% of a CPU", c * 100.0))
                .unwrap_or_else(|| "?".into())
        ),
        format!(
            "{:<44} {:>9.1} {:>22} {:>14}",
            "gui-vm, directly on weston's socket", local.fps, 0, "-"
        ),
        format!(
            "(a full frame is {} bytes; {} frames each; under nested emulation)",
            640 * 480 * 4,
            proxy.frames
        ),
        format!("BENCH wayland fps_ratio_vs_local={ratio:.2} copied_bytes_per_frame={copied}"),
    ]
}

/// Builds the bench system with `frames` frames per run, boots it and reports.
pub fn bench_wayland(
    kernel: &Kernel,
    cache_dir: &Path,
    workspace: &Path,
    frames: u32,
) -> Result<Vec<String>, BenchError> {
    let src = workspace.join("rootfs/bench/wayland");
    let dir = workspace.join("target/bulkhead/bench-wayland");
    let _ = std::fs::remove_dir_all(&dir);
    for rel in [
        "system.toml",
        "policy.d/10-base.policy",
        "guests/gui/guest.toml",
        "guests/app/guest.toml",
    ] {
        let text = std::fs::read_to_string(src.join(rel))
            .map_err(|e| BenchError::Setup(format!("{}: {e}", src.join(rel).display())))?;
        write_file(&dir.join(rel), &text.replace("FRAMES", &frames.to_string()))?;
    }
    let image = dir.join("host.cpio.gz");
    let kernels = SystemKernels::all(kernel.clone());
    let disks = build_system_image(&kernels, cache_dir, workspace, &dir, &image)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let mut cfg = QemuConfig::host(&kernel.vmlinuz, &image, crate::HOST_CMDLINE);
    cfg.disks = disks;
    cfg.second_serial = Some(dir.join("screens.bin"));
    // BULKHEAD_TEST_ECHO=1 streams the console, as in the tests.
    let echo = std::env::var_os("BULKHEAD_TEST_ECHO").is_some();
    let mut m = Machine::spawn(&cfg, echo).map_err(|e| BenchError::Run(e.to_string()))?;
    let end = m
        .wait_end(Duration::from_secs(2400))
        .map_err(|e| BenchError::Run(e.to_string()))?;
    if end != Outcome::PowerOff {
        return Err(BenchError::Run(format!(
            "the bench host ended with {end:?}\n{}",
            m.context()
        )));
    }
    let find = |prefix: &str| {
        m.lines()
            .iter()
            .find_map(|l| l.strip_prefix(prefix).and_then(parse_run))
    };
    let proxy = find("app-vm: bench: proxy: ");
    let local = find("gui-vm: agent: local: ");
    match (proxy, local) {
        (Some(p), Some(l)) => Ok(report(&p, &l)),
        _ => Err(BenchError::Run(format!(
            "no result lines from both runs\n{}",
            m.context()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse_and_the_report_ends_with_the_bench_line() {
        let p = parse_run(
            "frames=200 seconds=20.00 fps=10.0 copied_bytes_per_frame=1228800 proxy_cpu_seconds=3.00 proxy_cpu_share=0.15",
        )
        .unwrap();
        let l = parse_run("frames=200 seconds=10.00 fps=20.0").unwrap();
        assert_eq!(p.copied_per_frame, Some(1_228_800));
        assert_eq!(l.copied_per_frame, None);
        let r = report(&p, &l);
        assert_eq!(
            r.last().unwrap(),
            "BENCH wayland fps_ratio_vs_local=0.50 copied_bytes_per_frame=1228800"
        );
        assert!(r[1].contains("15% of a CPU"), "{}", r[1]);
        assert!(parse_run("frames=x fps=1").is_none());
    }
}
