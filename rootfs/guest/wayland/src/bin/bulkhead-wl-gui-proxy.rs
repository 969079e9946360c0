//! bulkhead-wl-gui-proxy: the GUI-side Wayland proxy (runs in gui-vm, next to weston).
//!
//! Provides the virtio_wl service `--service` (default `wayland`) through the hub and joins
//! each connection to weston's socket `--compositor` (a path, or a name in
//! $XDG_RUNTIME_DIR; default `wayland-0`). See docs/wayland.md.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_wayland::gui::serve;
use bulkhead_wayland::transport::virtio::Virtio;

#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "GUI-side Wayland proxy: provides the virtio_wl service and joins each connection to weston"
)]
struct Cli {
    /// The virtio_wl service to provide (the policy must grant `provide` of it).
    #[arg(long, default_value = "wayland")]
    service: String,
    /// weston's socket: a path, or a name in $XDG_RUNTIME_DIR.
    #[arg(long, default_value = "wayland-0")]
    compositor: String,
    /// The virtio_wl device node.
    #[arg(long, default_value = "/dev/wl0")]
    device: PathBuf,
    /// How long to wait for weston's socket when a connection comes (seconds).
    #[arg(long, default_value_t = 30)]
    wait: u64,
}

fn run(cli: Cli) -> Result<(), String> {
    let path = if cli.compositor.contains('/') {
        PathBuf::from(&cli.compositor)
    } else {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .ok_or("XDG_RUNTIME_DIR is not set (give --compositor a path)")?;
        PathBuf::from(dir).join(&cli.compositor)
    };
    let transport =
        Virtio::open(&cli.device).map_err(|e| format!("{}: {e}", cli.device.display()))?;
    let acceptor = transport
        .listen(&cli.service)
        .map_err(|e| format!("cannot provide {}: {e} (is it granted?)", cli.service))?;
    log::info!("providing {}, joined to {}", cli.service, path.display());
    let shared = Arc::new(transport);
    let mut acceptor = Some(acceptor);
    loop {
        let a = match acceptor.take() {
            Some(a) => a,
            // The listener context ended (the VMM reset the device, or the hub restarted):
            // provide the service again; connections already joined go on.
            None => match transport.listen(&cli.service) {
                Ok(a) => {
                    log::info!("providing {} again", cli.service);
                    a
                }
                Err(e) => {
                    log::warn!("cannot provide {} yet: {e}", cli.service);
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        if let Err(e) = serve(
            a,
            shared.clone(),
            path.clone(),
            Duration::from_secs(cli.wait),
        ) {
            log::warn!("the listener ended: {e}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
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
