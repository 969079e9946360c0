//! The net VM's program: bridges app VMs' virtio-net devices to the NIC (docs/net.md).
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use bulkhead_netd::bridge::{find_uplink, Bridge};
use bulkhead_netd::server::{serve, UPLINK_WAIT};
use bulkhead_netd::transport::{Accept, UnixAccept, WlAccept};
use clap::Parser;

/// Provides the virtio_wl service `net`: each app VM that connects gets a TAP on an
/// isolating bridge whose uplink is this VM's NIC.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-netd", version)]
struct Cli {
    /// The virtio_wl service to provide (the policy must grant `provide` of it).
    #[arg(long, default_value = "net")]
    service: String,
    /// The virtio_wl device.
    #[arg(long, default_value = "/dev/wl0")]
    device: PathBuf,
    /// Take connections on this Unix SOCK_SEQPACKET socket instead of virtio_wl (tests,
    /// host-side use).
    #[arg(long)]
    listen_unix: Option<PathBuf>,
    /// The NIC (default: the first interface backed by a device, waiting for its driver).
    #[arg(long)]
    uplink: Option<String>,
    /// The bridge to create (or use).
    #[arg(long, default_value = "br0")]
    bridge: String,
    /// An address for the net VM itself on the bridge (CIDR, e.g. 198.51.100.2/24).
    #[arg(long)]
    address: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn run(cli: Cli) -> Result<(), String> {
    let uplink = match cli.uplink {
        Some(u) => u,
        None => find_uplink(UPLINK_WAIT)?,
    };
    let bridge = Bridge::setup(&cli.bridge, &uplink, cli.address.as_deref())?;
    println!(
        "netd: bridge {} up with uplink {uplink}{}",
        bridge.name,
        cli.address
            .as_deref()
            .map(|a| format!(", address {a}"))
            .unwrap_or_default()
    );
    let mut accept: Box<dyn Accept> = match &cli.listen_unix {
        Some(p) => Box::new(UnixAccept::bind(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => Box::new(WlAccept::provide(&cli.device, &cli.service)?),
    };
    println!("netd: providing {}", cli.service);
    serve(accept.as_mut(), &bridge, &|| STOP.load(Ordering::SeqCst))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_term as *const () as libc::sighandler_t) };
    }
    match run(cli) {
        Ok(()) => {
            println!("netd: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("netd: error: {e}");
            ExitCode::FAILURE
        }
    }
}
