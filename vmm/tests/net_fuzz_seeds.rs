//! Runs the `net_chains` fuzz target's body over its seeds (vmm/fuzz/seeds/net_chains) and,
//! when present, the local corpus and crash artifacts of `cargo fuzz`, so the normal test
//! suite covers them; the named seeds must do what they were made for.

use std::path::Path;

use bulkhead_vmm::devices::virtio::net::fuzz::exercise;
use bulkhead_vmm::devices::virtio::net::stats::{get, NetStats};

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(data) = std::fs::read(e.path()) {
            exercise(&data);
            n += 1;
        }
    }
    n
}

fn seed(name: &str) -> NetStats {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds/net_chains")
        .join(name);
    exercise(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

#[test]
fn net_fuzz_seeds_and_corpus_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&fuzz.join("seeds/net_chains"));
    assert!(seeds >= 10, "expected the checked-in seeds, found {seeds}");
    run_dir(&fuzz.join("corpus/net_chains"));
    run_dir(&fuzz.join("artifacts/net_chains"));
}

#[test]
fn the_seeds_reach_what_they_were_made_for() {
    let s = seed("tx_one_frame");
    assert_eq!((get(&s.tx_frames), get(&s.tx_malformed)), (1, 0));
    assert_eq!(get(&seed("tx_split_header").tx_frames), 1);
    assert_eq!(get(&seed("tx_indirect").tx_frames), 1);
    assert_eq!(get(&seed("tx_tso4").tx_frames), 1);
    assert_eq!(get(&seed("tx_tso4_not_negotiated").tx_malformed), 1);
    let s = seed("tx_malformed_mix");
    assert_eq!((get(&s.tx_frames), get(&s.tx_malformed)), (1, 4));
    let s = seed("rx_mergeable");
    assert_eq!((get(&s.rx_frames), get(&s.rx_malformed)), (1, 0));
    assert_eq!(get(&seed("rx_single_too_small").rx_too_big), 1);
    assert_eq!(get(&seed("rx_two_frames").rx_frames), 2);
    assert_eq!(get(&seed("rx_gso_not_negotiated").rx_malformed), 1);
    for broken in [
        "rx_bad_kind",
        "rx_prod_past_end",
        "rx_record_longer_than_published",
    ] {
        let s = seed(broken);
        assert_eq!(get(&s.rx_frames), 0, "{broken}");
    }
}
