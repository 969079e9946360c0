//! The desktop side of a Bulkhead GUI VM, as a library: what weston says its scene is
//! ([`scene`], from `weston-debug scene-graph`), and the frames that carry screenshots from
//! the GUI VM to the host and on to the build machine ([`frame`]).

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

pub mod frame;
pub mod pattern;
pub mod scene;
