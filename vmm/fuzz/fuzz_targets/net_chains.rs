//! Fuzz virtio-net's request parsing: arbitrary bytes as a guest's memory (descriptor
//! tables, available rings, buffers) and as the RX ring a hostile net VM wrote. The TX and
//! RX passes (with EVENT_IDX or without) must never panic or spin, and every frame put in
//! the TX ring must carry a checked header. The body is `net::fuzz::exercise`, compiled
//! from the VMM's own source files; the main test suite also runs it over the seeds in
//! ../seeds/net_chains (vmm/tests/net_fuzz_seeds.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

mod vstate {
    pub mod memory {
        pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
    }
}

// The VMM's own files: src/devices/virtio/net/{fuzz,header,queues,rx,stats,tx}.rs.
#[allow(dead_code)]
#[path = "../../src/devices"]
mod devices {
    pub mod virtio {
        pub mod net {
            pub mod fuzz;
            pub mod header;
            pub mod queues;
            pub mod rx;
            pub mod stats;
            pub mod tx;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = devices::virtio::net::fuzz::exercise(data);
});
