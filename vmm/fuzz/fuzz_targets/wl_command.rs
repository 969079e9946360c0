//! Fuzz the virtio_wl command parser: arbitrary out-queue bytes must parse to a command or an
//! error response, never a panic. The body is `protocol::fuzz_exercise`; the main test suite
//! also runs it over the seed inputs in ../seeds (vmm/tests/wl_fuzz_seeds.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_vmm::devices::virtio::wl::protocol::fuzz_exercise(data);
});
