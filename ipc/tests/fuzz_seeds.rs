//! Runs the `hub_frames` fuzz target's body over its seed inputs (ipc/fuzz/seeds) and, when
//! present, the local corpus and crash artifacts of `cargo fuzz`, so the normal test suite
//! covers them.

use std::path::Path;

use bulkhead_ipc::fuzz::HubFrames;

fn run_dir(h: &mut HubFrames, dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(data) = std::fs::read(e.path()) {
            h.exercise(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn hub_frames_fuzz_seeds_and_corpus_do_not_stop_the_hub() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut h = HubFrames::new();
    let seeds = run_dir(&mut h, &fuzz.join("seeds"));
    assert!(seeds >= 10, "expected the checked-in seeds, found {seeds}");
    run_dir(&mut h, &fuzz.join("corpus/hub_frames"));
    run_dir(&mut h, &fuzz.join("artifacts/hub_frames"));
}
