//! Fuzz the policy parser and validator: arbitrary bytes must give a policy or diagnostics,
//! never a panic, and memory must stay bounded (run with -rss_limit_mb). The body is
//! `bulkhead_policy::fuzz_check::exercise`, which the main test suite also runs over the
//! seed inputs in ../seeds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_policy::fuzz_check::exercise(data);
});
