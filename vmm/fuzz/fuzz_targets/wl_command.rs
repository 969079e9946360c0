//! Fuzz the virtio_wl command parser: arbitrary out-queue bytes must parse to a command or an
//! error response, never a panic. The body is `protocol::fuzz_exercise`, compiled from the
//! VMM's own source file; the main test suite also runs it over the seed inputs in ../seeds
//! (vmm/tests/wl_fuzz_seeds.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/devices/virtio/wl/protocol.rs"]
mod protocol;

fuzz_target!(|data: &[u8]| {
    protocol::fuzz_exercise(data);
});
