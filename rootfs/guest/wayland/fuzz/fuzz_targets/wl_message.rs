//! Fuzz the app-side proxy's message handling: arbitrary bytes, cut into Wayland messages,
//! each decoded against the protocol tables and handled as a client request or a
//! compositor event by one client's state (object tracking, registry, shm pools, commits,
//! fd translation over the stand-in transport). Every outcome must be a message, a protocol
//! error or a fault: never a panic. The body is `bulkhead_wayland::fuzz::exercise`; the
//! crate's tests run it over the seeds in ../seeds (tests/fuzz_seeds.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_wayland::fuzz::exercise(data);
});
