//! Benchmarks run as commands (`bulkhead-rootfs bench …`), each inside one L1 boot against a
//! real peer measured in the same run; each ends with one `BENCH <name> key=value …` line.
//!
//! - `vmm` (`bench/vmm.rs`): bulkhead-vmm against QEMU microvm, boot time and memory.
//! - `wl` (`bench/wl.rs`): virtio_wl round trips against a socketpair, guest-to-guest shared
//!   memory against memcpy.
//! - `net` (`bench/net.rs`): TCP throughput and round trips from an app VM through net-vm
//!   against net-vm itself, both to the test peer.
//! - `wayland` (`bench/wayland.rs`): a full-damage shm client through the Wayland proxies
//!   against the same client directly on weston.

use std::path::Path;
use std::time::Duration;

use crate::qemu::{Machine, Outcome, QemuConfig};

pub mod net;
pub mod probe;
pub mod vmm;
pub mod wayland;
pub mod wl;
pub mod wl_peers;

pub use vmm::{bench_vmm, qemu_files};
pub use wl::bench_wl;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Run(String),
}

/// Writes a generated system file, creating its directory.
pub(crate) fn write_file(p: &Path, text: &str) -> Result<(), BenchError> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| BenchError::Setup(e.to_string()))?;
    }
    std::fs::write(p, text).map_err(|e| BenchError::Setup(format!("{}: {e}", p.display())))
}

/// Boots a bench image, waits for the host to power off and returns what the `bench`
/// service printed (without init's `bench: ` prefix). Fails unless the host powered off and
/// a line starts with `want`.
pub(crate) fn boot_and_collect(
    cfg: &QemuConfig,
    timeout: Duration,
    want: &str,
) -> Result<Vec<String>, BenchError> {
    let mut m = Machine::spawn(cfg, false).map_err(|e| BenchError::Run(e.to_string()))?;
    let end = m
        .wait_end(timeout)
        .map_err(|e| BenchError::Run(e.to_string()))?;
    let lines: Vec<String> = m
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("bench: "))
        .map(|l| l.trim_start_matches("bench: ").to_string())
        .collect();
    if end != Outcome::PowerOff {
        return Err(BenchError::Run(format!(
            "the bench host ended with {end:?}\n{}",
            m.context()
        )));
    }
    if !lines.iter().any(|l| l.starts_with(want)) {
        return Err(BenchError::Run(format!(
            "no {want:?} line\n{}",
            m.context()
        )));
    }
    Ok(lines)
}
