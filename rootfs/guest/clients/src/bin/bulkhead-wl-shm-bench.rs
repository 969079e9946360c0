//! `bulkhead-wl-shm-bench`: commits frames of shared memory with full damage, each after the
//! previous frame's callback, for a number of frames, and prints one line:
//! `bench: frames=N seconds=S fps=F` plus, with the app-side proxy's `--stats-file` and pid
//! name, the bytes it copied per frame and the CPU time it used. Run directly on weston's
//! socket it measures the compositor alone; through the proxies, the whole path.

use std::time::Instant;

use bulkhead_wl_clients::{Res, Window};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bulkhead-wl-shm-bench",
    about = "Frames per second of a full-damage shm client"
)]
struct Cli {
    /// Frames to commit (after two warm-up frames).
    #[arg(long, default_value_t = 200)]
    frames: u32,
    #[arg(long, default_value_t = 640)]
    width: u32,
    #[arg(long, default_value_t = 480)]
    height: u32,
    /// The app-side proxy's statistics file (for copied bytes).
    #[arg(long)]
    stats_file: Option<std::path::PathBuf>,
    /// The proxy's process name (for its CPU time, from /proc).
    #[arg(long)]
    proxy_name: Option<String>,
    /// A label for the output line.
    #[arg(long, default_value = "bench")]
    label: String,
    /// The window's title.
    #[arg(long, default_value = "bulkhead-bench")]
    title: String,
}

fn stat(path: &std::path::Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
}

/// utime + stime of the first process named `name`, in clock ticks.
fn cpu_ticks(name: &str) -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() != name.get(..name.len().min(15)).unwrap_or(name) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let after = stat.rsplit_once(") ")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let utime: u64 = f.get(11)?.parse().ok()?;
        let stime: u64 = f.get(12)?.parse().ok()?;
        return Some(utime + stime);
    }
    None
}

fn run(cli: &Cli) -> Res<()> {
    let mut w = Window::open(&cli.title, cli.width, cli.height, false)?;
    let size = (cli.width * cli.height * 4) as usize;
    let full = (0, 0, cli.width, cli.height);
    let mut frame = vec![0u8; size];
    for warm in 0..2u8 {
        frame.fill(warm);
        w.write(0, &frame)?;
        w.commit_and_wait(full)?;
    }
    let copied0 = cli
        .stats_file
        .as_deref()
        .and_then(|p| stat(p, "copied_bytes"));
    let cpu0 = cli.proxy_name.as_deref().and_then(cpu_ticks);
    let t0 = Instant::now();
    for i in 0..cli.frames {
        // A different picture each frame: a moving band.
        let band = (i as usize * 4 * cli.width as usize) % size;
        frame.fill((i % 251) as u8);
        if let Some(b) = frame.get_mut(band..(band + 4 * cli.width as usize).min(size)) {
            b.fill(0xff);
        }
        w.write(0, &frame)?;
        w.commit_and_wait(full)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let fps = f64::from(cli.frames) / secs;
    let mut line = format!(
        "{}: frames={} seconds={secs:.2} fps={fps:.1}",
        cli.label, cli.frames
    );
    if let (Some(a), Some(b)) = (
        copied0,
        cli.stats_file
            .as_deref()
            .and_then(|p| stat(p, "copied_bytes")),
    ) {
        line += &format!(
            " copied_bytes_per_frame={}",
            b.saturating_sub(a) / u64::from(cli.frames.max(1))
        );
    }
    if let (Some(a), Some(b)) = (cpu0, cli.proxy_name.as_deref().and_then(cpu_ticks)) {
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let cpu = (b.saturating_sub(a)) as f64 / hz;
        line += &format!(
            " proxy_cpu_seconds={cpu:.2} proxy_cpu_share={:.2}",
            cpu / secs
        );
    }
    println!("{line}");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
