//! Runs the virtio_wl fuzz target's body over the seed inputs (vmm/fuzz/seeds) and, when
//! present, the local corpus and crash artifacts of `cargo fuzz`, so the normal test suite
//! covers them.

use std::path::Path;

use bulkhead_vmm::devices::virtio::wl::protocol::fuzz_exercise;

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(data) = std::fs::read(e.path()) {
            fuzz_exercise(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn wl_fuzz_seeds_and_corpus_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&fuzz.join("seeds"));
    assert!(seeds >= 10, "expected the checked-in seeds, found {seeds}");
    run_dir(&fuzz.join("corpus/wl_command"));
    run_dir(&fuzz.join("artifacts/wl_command"));
}
