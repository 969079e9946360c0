//! Runs the fuzz target's body over the seed inputs (policy/fuzz/seeds) and, when present,
//! the local corpus and crash artifacts of `cargo fuzz`, so the normal test suite covers them.

use std::path::Path;

fn run_dir(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd {
        let p = e.unwrap().path();
        if p.is_file() {
            let data = std::fs::read(&p).unwrap();
            bulkhead_policy::fuzz_check::exercise(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuzz_seeds_and_corpus_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&fuzz.join("seeds"));
    assert!(seeds >= 5, "expected the checked-in seeds, found {seeds}");
    run_dir(&fuzz.join("corpus/parse"));
    run_dir(&fuzz.join("artifacts/parse"));
}

#[test]
fn fuzz_inline_edge_cases() {
    for data in [
        &b""[..],
        b"\xff\xff\xff",
        b"include sub/1.policy\n\xffinclude sub/1.policy\n",
        b"include sub/2.policy\n\xffinclude sub/2.policy\xffinclude 10-a.policy\n",
        b"grant a quota shm=16777215TiB\n",
        b"group g a\ngrant @g connect s\ngrant p provide s c2s=fence:wait+signal+transfer+dup\n",
    ] {
        bulkhead_policy::fuzz_check::exercise(data);
    }
}
