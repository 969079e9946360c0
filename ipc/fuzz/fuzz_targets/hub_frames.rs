//! Fuzz the hub's handling of what a VMM sends on a connection (whole sends, parts of sends,
//! garbage), against a real hub on a thread kept across inputs: whatever comes, the hub goes
//! on, and a good send afterwards is accepted and delivered. The body is
//! `bulkhead_ipc::fuzz::HubFrames::exercise`; `ipc/tests/fuzz_seeds.rs` runs it over
//! ../seeds.
#![no_main]

use std::sync::{Mutex, OnceLock};

use bulkhead_ipc::fuzz::HubFrames;
use libfuzzer_sys::fuzz_target;

static HUB: OnceLock<Mutex<HubFrames>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let hub = HUB.get_or_init(|| Mutex::new(HubFrames::new()));
    if let Ok(mut h) = hub.lock() {
        h.exercise(data);
    }
});
