//! Bulkhead's PID 1, as a library of small mechanisms (the binary `bulkhead-init` wires
//! them together in `main.rs`). Everything that can be tested without being PID 1 lives
//! here: command line, configuration, module index, supervision state machine, control
//! protocol, output handling.

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

pub mod cmdline;
pub mod config;
pub mod control;
pub mod devices;
pub mod handoff;
pub mod input;
pub mod jail;
pub mod log;
pub mod modules;
pub mod mounts;
pub mod output;
pub mod panic;
pub mod runtime;
pub mod services;
pub mod shutdown;
pub mod signals;
pub mod spawn;
pub mod stop;
pub mod supervisor;
