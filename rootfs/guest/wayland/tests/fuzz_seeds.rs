//! Runs the fuzz target's body over the committed seeds (fuzz/seeds) and, when present, the
//! local corpus and crash artifacts of `cargo fuzz`, so the normal test suite covers them.

use std::path::Path;

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(data) = std::fs::read(e.path()) {
            bulkhead_wayland::fuzz::exercise(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn the_seeds_reach_deep_into_the_state() {
    // Each valid seed is handled to its end (a seed that stopped early would fuzz little).
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, n) in [
        ("shm_commit", 15),
        ("registry", 6),
        ("resize", 8),
        ("resize_delete", 7),
        ("sync_done", 4),
        ("seat_keymap", 5),
        ("data_device", 8),
        ("data_source", 8),
    ] {
        let data = std::fs::read(seeds.join(name)).unwrap();
        assert_eq!(bulkhead_wayland::fuzz::exercise(&data), n, "{name}");
    }
    // The malformed ones stop at their bad message. keymap_past_the_end: a keymap larger
    // than its memory (once a SIGBUS: the copy fell back to loads through a mapping past
    // the file's end).
    for (name, n) in [
        ("bad_size", 0),
        ("unknown_opcode", 0),
        ("missing_fd", 7),
        ("bad_string", 1),
        ("unknown_object", 0),
        ("keymap_past_the_end", 4),
    ] {
        let data = std::fs::read(seeds.join(name)).unwrap();
        assert_eq!(bulkhead_wayland::fuzz::exercise(&data), n, "{name}");
    }
}

#[test]
fn wayland_fuzz_seeds_and_corpus_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = run_dir(&fuzz.join("seeds"));
    assert!(seeds >= 10, "expected the checked-in seeds, found {seeds}");
    run_dir(&fuzz.join("corpus/wl_message"));
    run_dir(&fuzz.join("artifacts/wl_message"));
}

#[test]
fn gui_registry_seeds_and_corpus_do_not_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = fuzz.join("seeds-gui");
    let run = |name: &str| {
        let data = std::fs::read(seeds.join(name)).unwrap();
        bulkhead_wayland::fuzz::exercise_gui_filter(&data)
    };
    // The valid flow forwards everything up to the refused bind of weston_screenshooter:
    // get_registry and sync (24 bytes), the served global and the callback (36 + 12 of
    // the events: weston_debug_v1's global and global_remove, and the screenshooter's
    // global, are dropped), the bind of wl_compositor and a request on it (40 + 12).
    assert_eq!(run("registry_flow"), 24 + 36 + 12 + 40 + 12);
    assert_eq!(run("split_event"), 12 + 36 + 40 + 12);
    // A bind before its global, a bad size, a malformed global: nothing or only what came
    // before.
    assert_eq!(run("bind_before_global"), 0);
    assert_eq!(run("bad_size"), 0);
    assert_eq!(run("malformed_global"), 12);
    let n = run_dir_gui(&seeds);
    assert!(n >= 5, "expected the checked-in seeds, found {n}");
    run_dir_gui(&fuzz.join("corpus/gui_registry"));
    run_dir_gui(&fuzz.join("artifacts/gui_registry"));
}

fn run_dir_gui(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Ok(data) = std::fs::read(e.path()) {
            bulkhead_wayland::fuzz::exercise_gui_filter(&data);
            n += 1;
        }
    }
    n
}
