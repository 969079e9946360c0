//! Real Debian weston and real stock clients through both proxies, joined by the stand-in
//! transport (socketpairs and memfds in place of virtio_wl; the names say so).

mod common;

use std::sync::atomic::Ordering;

use common::*;

#[test]
fn standin_transport_simple_shm_window_through_both_proxies_is_on_screen() {
    need("weston-simple-shm", "weston");
    let weston = Weston::headless();
    let p = proxies(&weston, 1);
    let before = weston.screenshot();
    let client = p.apps[0].client("weston-simple-shm").spawn().unwrap();
    let stats = p.apps[0].stats.clone();
    wait_for("frames through the proxy", 60, || {
        stats.commits.load(Ordering::Relaxed) >= 10
    });
    let after = weston.screenshot();
    stop(client);
    // weston-simple-shm's window is 250x250 with a changing pattern: a large part of the
    // screen differs from the empty desktop.
    let changed = before.diff(&after);
    assert!(
        changed > 150 * 150,
        "only {changed} pixels changed: no window?"
    );
    let copied = stats.copied_bytes.load(Ordering::Relaxed);
    assert!(copied >= 250 * 250 * 4, "copied {copied} bytes");
}
