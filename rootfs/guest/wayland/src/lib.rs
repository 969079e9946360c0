//! bulkhead-wayland: the two Wayland proxies that let a stock client in an app VM show its
//! window on stock weston in gui-vm, across virtio_wl and the hub.
//!
//! ```text
//!  app VM                                                   gui-vm
//!  client ─► $XDG_RUNTIME_DIR/wayland-0                     listen:wayland (faux accept)
//!            bulkhead-wl-app-proxy ══ virtio_wl (hub) ════ bulkhead-wl-gui-proxy ─► weston
//!            (protocol-aware: app/)                         (registry filter, bytes, fds: gui/)
//! ```
//!
//! - [`app`]: the app-side proxy. It decodes every message against the tables generated
//!   from the protocol XML ([`protocol`], [`wire`]), tracks objects ([`objects`]), and
//!   translates what carries fds: shm pools become virtio_wl shared memory filled at each
//!   commit with only the damaged bytes ([`region`], `app/shm.rs`), keymaps are copied,
//!   clipboard pipes are spliced ([`pipes`]). It hides globals it cannot serve and answers a
//!   bad request with `wl_display.error` to that client alone.
//! - [`gui`]: the GUI-side proxy: bytes and vfds as they are, except the registry, whose
//!   globals it filters with the app proxy's allow-list (a connection from the hub never
//!   binds weston's privileged globals); weston's own fds translated.
//! - [`transport`]: virtio_wl behind a trait: the device ([`transport::virtio`]) or the
//!   test stand-in of socketpairs and memfds ([`transport::standin`]).
//!
//! Command lines: `bulkhead-wl-app-proxy --help`, `bulkhead-wl-gui-proxy --help`; see
//! docs/wayland.md.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod app;
pub mod batch;
pub mod fuzz;
pub mod gui;
pub mod objects;
pub mod pipes;
pub mod protocol;
pub mod region;
pub mod sock;
pub mod stats;
pub mod transport;
pub mod wire;

/// Logging for the proxy binaries: `RUST_LOG` or info, one line per record, no timestamp
/// (the guest's init prefixes each line with the program's name).
pub fn init_logging() {
    use std::io::Write;
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|f, r| writeln!(f, "{}: {}", r.level().as_str().to_lowercase(), r.args()))
        .try_init();
}
