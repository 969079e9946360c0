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

#[test]
fn standin_transport_two_clients_of_one_app_proxy_and_a_second_app_proxy_all_show() {
    need("weston-flower", "weston");
    need("weston-simple-shm", "weston");
    let weston = Weston::headless();
    let p = proxies(&weston, 2);
    let before = weston.screenshot();
    let shm = p.apps[0].client("weston-simple-shm").spawn().unwrap();
    let s0 = p.apps[0].stats.clone();
    wait_for("simple-shm frames", 60, || {
        s0.commits.load(Ordering::Relaxed) >= 5
    });
    let one = weston.screenshot();
    let flower = p.apps[0].client("weston-flower").spawn().unwrap();
    wait_for("a second client", 60, || {
        s0.clients.load(Ordering::Relaxed) >= 2
    });
    let shm2 = p.apps[1].client("weston-simple-shm").spawn().unwrap();
    let s1 = p.apps[1].stats.clone();
    wait_for("the second app proxy's frames", 60, || {
        s1.commits.load(Ordering::Relaxed) >= 5
    });
    // weston-flower draws once; give weston a moment to place it.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let all = weston.screenshot();
    stop(shm);
    stop(flower);
    stop(shm2);
    let first = before.diff(&one);
    let more = one.diff(&all);
    assert!(first > 150 * 150, "first window: {first} pixels");
    assert!(
        more > 150 * 150,
        "the other two windows: only {more} pixels changed"
    );
}

#[test]
fn standin_transport_clipboard_from_wl_copy_in_one_app_to_wl_paste_in_another() {
    need("wl-copy", "wl-clipboard");
    need("wl-paste", "wl-clipboard");
    let weston = Weston::with_seat();
    let p = proxies(&weston, 2);
    let copy = p.apps[0]
        .client("wl-copy")
        .args(["--foreground", "hello across VMs"])
        .spawn()
        .unwrap();
    let mut pasted = String::new();
    wait_for("the selection in the other app", 60, || {
        let out = p.apps[1]
            .client("wl-paste")
            .arg("--no-newline")
            .output()
            .unwrap();
        pasted = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success() && pasted == "hello across VMs"
    });
    stop(copy);
    // Both clients had keyboard focus: weston's keymap crossed (its memfd became shared
    // memory on the GUI side, and a local copy on the app side).
    assert!(p.apps[0].stats.blob_bytes.load(Ordering::Relaxed) > 1000);
    assert!(bulkhead_wayland::gui::BLOB_BYTES.load(Ordering::Relaxed) > 1000);
}

#[test]
fn standin_transport_wayland_info_through_the_proxy_lists_no_fence_and_no_private_globals() {
    need("wayland-info", "wayland-utils");
    let weston = Weston::with_seat();
    let p = proxies(&weston, 1);
    let direct = std::process::Command::new("wayland-info")
        .env("XDG_RUNTIME_DIR", weston.dir.path())
        .env("WAYLAND_DISPLAY", &weston.socket)
        .output()
        .unwrap();
    let via = p.apps[0].client("wayland-info").output().unwrap();
    assert!(
        via.status.success(),
        "{}",
        String::from_utf8_lossy(&via.stderr)
    );
    let (direct, via) = (
        String::from_utf8_lossy(&direct.stdout).into_owned(),
        String::from_utf8_lossy(&via.stdout).into_owned(),
    );
    let globals = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("interface: '"))
            .filter_map(|l| l.split('\'').next())
            .map(String::from)
            .collect()
    };
    let (direct, via) = (globals(&direct), globals(&via));
    // Every global weston offers that the proxy cannot serve is absent through it (weston
    // with pixman offers no dmabuf; that one is tested on socketpairs), and there are some.
    let hidden: Vec<&String> = direct
        .iter()
        .filter(|g| {
            matches!(
                bulkhead_wayland::protocol::global_verdict(g),
                bulkhead_wayland::protocol::Verdict::Hide(_)
            )
        })
        .collect();
    assert!(
        hidden.iter().any(|g| g.starts_with("weston_")),
        "{direct:?}"
    );
    for g in &hidden {
        assert!(!via.contains(g), "{g} is hidden through the proxy");
    }
    for g in direct.iter().filter(|g| !hidden.contains(g)) {
        assert!(via.contains(g), "{g} is served through the proxy: {via:?}");
    }
    for served in [
        "wl_compositor",
        "wl_shm",
        "wl_seat",
        "xdg_wm_base",
        "wl_data_device_manager",
        "wl_output",
    ] {
        assert!(
            via.iter().any(|g| g == served),
            "{served} is served: {via:?}"
        );
    }
}

#[test]
fn standin_transport_exact_pattern_on_screen_and_only_the_damaged_rectangle_copied() {
    use std::io::{BufRead, Write};
    let weston = Weston::headless();
    let p = proxies(&weston, 1);
    let stats = p.apps[0].stats.clone();
    let mut c = p.apps[0]
        .client(env!("CARGO_BIN_EXE_bulkhead-wl-pattern"))
        .args(["--damage", "60,40,30,20", "--pause-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "frame 1 shown (200x150)");
    let one = weston.screenshot();
    // The window is where its pure red quadrant starts; every pixel of it is the pattern.
    let red = (0..one.height)
        .flat_map(|y| (0..one.width).map(move |x| (x, y)))
        .find(|&(x, y)| one.px(x, y)[..3] == [255, 0, 0])
        .expect("the pattern's red quadrant is on screen");
    let (x0, y0) = red;
    let rgb = |c: u32| [(c >> 16) as u8, (c >> 8) as u8, c as u8];
    let want = |x: usize, y: usize| {
        let q = usize::from(x >= 100) + 2 * usize::from(y >= 75);
        rgb([0xff0000, 0x00ff00, 0x0000ff, 0xffff00][q])
    };
    for y in 0..150 {
        for x in 0..200 {
            assert_eq!(
                one.px(x0 + x, y0 + y)[..3],
                want(x, y),
                "pixel ({x}, {y}) of the window"
            );
        }
    }
    assert_eq!(stats.copied_bytes.load(Ordering::Relaxed), 200 * 150 * 4);
    // Frame 2: one 30x20 rectangle changes; the screen changes there and nowhere else, and
    // the proxy copied exactly its bytes.
    c.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "frame 2 shown (damage 60,40,30,20)");
    let two = weston.screenshot();
    stop(c);
    let mut changed = Vec::new();
    for y in 0..one.height {
        for x in 0..one.width {
            if one.px(x, y)[..3] != two.px(x, y)[..3] {
                changed.push((x, y));
            }
        }
    }
    // (The panel's clock may tick between the two pictures: only the window is compared.)
    let in_window = |&(x, y): &(usize, usize)| x >= x0 && x < x0 + 200 && y >= y0 && y < y0 + 150;
    let changed: Vec<_> = changed.into_iter().filter(in_window).collect();
    assert_eq!(changed.len(), 30 * 20, "pixels changed in the window");
    for (x, y) in changed {
        let (wx, wy) = (x - x0, y - y0);
        assert!(
            (60..90).contains(&wx) && (40..60).contains(&wy),
            "({wx}, {wy}) changed"
        );
        assert_eq!(two.px(x, y)[..3], [255, 0, 255]);
    }
    assert_eq!(stats.last_commit_bytes.load(Ordering::Relaxed), 30 * 20 * 4);
    assert_eq!(
        stats.copied_bytes.load(Ordering::Relaxed),
        200 * 150 * 4 + 30 * 20 * 4
    );
}

#[test]
fn standin_transport_a_malformed_client_is_cut_off_while_a_stock_client_goes_on() {
    use std::io::{Read, Write};
    need("weston-simple-shm", "weston");
    let weston = Weston::headless();
    let p = proxies(&weston, 1);
    let s = p.apps[0].stats.clone();
    let shm = p.apps[0].client("weston-simple-shm").spawn().unwrap();
    wait_for("simple-shm frames", 60, || {
        s.commits.load(Ordering::Relaxed) >= 5
    });
    // A client of the same proxy sends a message with an impossible size.
    let mut bad = std::os::unix::net::UnixStream::connect(&p.apps[0].socket).unwrap();
    bad.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    bad.write_all(&[1, 0, 0, 0, 1, 0, 6, 0]).unwrap();
    let mut got = Vec::new();
    bad.read_to_end(&mut got).unwrap();
    assert!(got.len() >= 16, "a wl_display.error event, then the end");
    assert_eq!(&got[..4], &1u32.to_ne_bytes(), "from wl_display");
    wait_for("the error counted", 30, || {
        s.protocol_errors.load(Ordering::Relaxed) == 1
    });
    let before = s.commits.load(Ordering::Relaxed);
    wait_for("simple-shm still drawing", 60, || {
        s.commits.load(Ordering::Relaxed) >= before + 10
    });
    stop(shm);
}
