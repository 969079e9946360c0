//! bulkhead-wl-app-proxy: the app-side Wayland proxy (runs in an app VM).
//!
//! Listens on `$XDG_RUNTIME_DIR/wayland-0` (or `--socket`) for stock Wayland clients; each
//! client gets its own virtio_wl connection to `--connect` (default `wayland@gui-vm`),
//! through the hub. See docs/wayland.md.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bulkhead_wayland::app::{serve, Config};
use bulkhead_wayland::stats::Stats;
use bulkhead_wayland::transport::virtio::Virtio;

#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "App-side Wayland proxy: stock clients here, weston in another VM over virtio_wl"
)]
struct Cli {
    /// The virtio_wl service each client is connected to.
    #[arg(long, default_value = "wayland@gui-vm")]
    connect: String,
    /// The Wayland socket clients connect to: a path, or a name in $XDG_RUNTIME_DIR.
    #[arg(long, default_value = "wayland-0")]
    socket: String,
    /// Rewrite this file with the counters (copied_bytes=, commits=, …) after every commit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// The virtio_wl device node.
    #[arg(long, default_value = "/dev/wl0")]
    device: PathBuf,
    /// Most clients at once.
    #[arg(long, default_value_t = 32)]
    max_clients: usize,
}

fn socket_path(s: &str) -> Result<PathBuf, String> {
    if s.contains('/') {
        return Ok(PathBuf::from(s));
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .ok_or("XDG_RUNTIME_DIR is not set (give --socket a path)")?;
    Ok(PathBuf::from(dir).join(s))
}

fn run(cli: Cli) -> Result<(), String> {
    let path = socket_path(&cli.socket)?;
    let transport =
        Virtio::open(&cli.device).map_err(|e| format!("{}: {e}", cli.device.display()))?;
    // A socket left by an earlier run is replaced; a live one is not stolen (bind fails).
    if std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("bind {}: {e}", path.display()))?;
    let stats = Arc::new(Stats::new(cli.stats_file));
    stats.write();
    log::info!(
        "listening on {}, clients go to {}",
        path.display(),
        cli.connect
    );
    serve(
        listener,
        Arc::new(transport),
        stats,
        Config {
            connect: cli.connect,
            max_clients: cli.max_clients,
        },
    )
    .map_err(|e| format!("accept: {e}"))
}

fn main() -> ExitCode {
    bulkhead_wayland::init_logging();
    let cli = <Cli as clap::Parser>::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
