//! The binaries' command lines: `--help` works, and without the virtio_wl device each proxy
//! exits 1 with an error that names it, never a panic.

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_the_options() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_bulkhead-wl-app-proxy"), &["--help"]);
    assert_eq!(code, 0);
    for o in ["--connect", "--socket", "--stats-file", "--max-clients"] {
        assert!(out.contains(o), "{o} in:\n{out}");
    }
    let (code, out, _) = run(env!("CARGO_BIN_EXE_bulkhead-wl-gui-proxy"), &["--help"]);
    assert_eq!(code, 0);
    for o in ["--service", "--compositor", "--wait"] {
        assert!(out.contains(o), "{o} in:\n{out}");
    }
    let (code, out, _) = run(env!("CARGO_BIN_EXE_bulkhead-wl-pattern"), &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--damage"));
}

#[test]
fn without_the_device_the_proxies_exit_1_naming_it() {
    for bin in [
        env!("CARGO_BIN_EXE_bulkhead-wl-app-proxy"),
        env!("CARGO_BIN_EXE_bulkhead-wl-gui-proxy"),
    ] {
        let (code, _, err) = run(bin, &["--device", "/nonexistent/wl0"]);
        assert_eq!(code, 1, "{bin}: {err}");
        assert!(err.contains("/nonexistent/wl0"), "{bin}: {err}");
        assert!(!err.contains("panicked"), "{bin}: {err}");
    }
}
