//! Fuzz the GUI proxy's registry filter: arbitrary bytes, cut into chunks fed as requests
//! from the hub's side or events from weston, framed into messages and the registry's
//! decoded. Every outcome must be forwarded bytes, a refusal or an error: never a panic.
//! The body is `bulkhead_wayland::fuzz::exercise_gui_filter`; the crate's tests run it over
//! the seeds in ../seeds-gui (tests/fuzz_seeds.rs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_wayland::fuzz::exercise_gui_filter(data);
});
