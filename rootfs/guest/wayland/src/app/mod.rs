//! The app-side proxy: runs in each app VM. Stock Wayland clients connect to its socket
//! (`$XDG_RUNTIME_DIR/wayland-0`); for each one it opens its own virtio_wl connection to
//! the GUI VM's `wayland` service and translates the protocol between the two (see
//! `state.rs` for what is translated, `shm.rs` for the shared-memory copy).

pub mod session;
pub mod shm;
pub mod state;

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::stats::Stats;
use crate::transport::Transport;

/// What the app proxy serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service to connect to for each client (`wayland@gui-vm`).
    pub connect: String,
    /// Most clients at once; more are refused (their socket is closed).
    pub max_clients: usize,
}

fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
        )
    )
}

/// Accepts clients on `listener` until it fails; each gets a thread and a connection.
pub fn serve(
    listener: UnixListener,
    transport: Arc<dyn Transport>,
    stats: Arc<Stats>,
    config: Config,
) -> std::io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    loop {
        let (client, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if transient(&e) => {
                // Out of fds or memory for a moment, or a client that left before it was
                // accepted: the proxy goes on.
                log::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if live.load(Ordering::SeqCst) >= config.max_clients {
            log::warn!("refusing a client: {} clients already", config.max_clients);
            continue;
        }
        let far = match transport.connect(&config.connect) {
            Ok(f) => f,
            Err(e) => {
                log::error!(
                    "cannot connect to {}: {e} (refused by the policy, or the service is not there)",
                    config.connect
                );
                continue;
            }
        };
        let n = stats.clients.fetch_add(1, Ordering::Relaxed);
        log::info!("client {n} connected to {}", config.connect);
        live.fetch_add(1, Ordering::SeqCst);
        let (t, s, l) = (transport.clone(), stats.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("wl-client-{n}"))
            .spawn(move || {
                let end = session::run(client, far, t, s.clone());
                if matches!(end, session::End::Protocol(_)) {
                    s.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    s.write();
                }
                l.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            live.fetch_sub(1, Ordering::SeqCst);
            log::error!("no thread for a client: {e}");
        }
    }
}
