//! The guest's PID 1, as a library: its configuration (`/etc/bulkhead/guest.toml`) and the
//! programs it runs. A Bulkhead guest exists for one purpose, so its init is small: it
//! mounts the early filesystems, loads the modules the guest needs (virtio, virtio_wl, …),
//! runs the VM's program(s) with their output on the console as `<name>: <line>`, and powers
//! the VM off when the last one ends (or when the VMM presses the power button). A guest that
//! names Debian packages first makes its read-only root disk `/` ([`root`]). It never
//! restarts anything: a VM whose program failed is the host init's to restart, as a whole.
//!
//! The mechanisms (mounts, module loading, logging, output lines, signals, power-off) are
//! the host init's own, from the `bulkhead-init` library.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod programs;
pub mod root;
