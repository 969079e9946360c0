//! Wayland across VMs, end to end, in one boot of `tests/systems/wayland`: stock Debian
//! weston in gui-vm; in app VMs, Bulkhead's pattern client, stock weston-simple-shm,
//! wl-copy, wl-paste and weston-flower behind the app-side proxy; every connection through
//! the hub. Verdicts come from the pictures (PNGs decoded here, positions from weston's own
//! scene graph sent with them), the emulated host's init and the hub's audit log (printed by
//! `policyctl` on the host); a guest's line is only used for what happens inside that guest
//! (what wl-paste read, the proxy's copy counter), matched by its `<vm>: <program>: ` prefix.

use std::time::{Duration, Instant};

use bulkhead_desktop::pattern;
use bulkhead_desktop::scene::View;
use bulkhead_rootfs::screens::{Image, Picture};
use bulkhead_tests::{End, Host};

fn picture<'a>(pics: &'a [Picture], name: &str, h: &Host) -> &'a Picture {
    pics.iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no picture {name}\n{}", h.context()))
}

/// Pixels of the pattern window in `img` that differ from the pattern (`changed`: after the
/// click), skipping the cursor's rectangle.
fn pattern_mismatches(img: &Image, w: &View, changed: bool, cursor: Option<&View>) -> usize {
    let mut bad = 0;
    for y in 0..pattern::HEIGHT {
        for x in 0..pattern::WIDTH {
            let (sx, sy) = (w.x1 + x as i32, w.y1 + y as i32);
            if cursor.is_some_and(|c| sx >= c.x1 && sx < c.x2 && sy >= c.y1 && sy < c.y2) {
                continue;
            }
            let want = pattern::rgb(x, y, changed);
            match img.pixel(i64::from(sx), i64::from(sy)) {
                Some([r, g, b, _]) if [r, g, b] == want => {}
                _ => bad += 1,
            }
        }
    }
    bad
}

/// Every pixel position where two pictures differ.
fn differences(a: &Image, b: &Image) -> Vec<(u32, u32)> {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let mut out = Vec::new();
    for y in 0..a.height {
        for x in 0..a.width {
            if a.pixel(i64::from(x), i64::from(y)) != b.pixel(i64::from(x), i64::from(y)) {
                out.push((x, y));
            }
        }
    }
    out
}

#[test]
fn stock_clients_in_app_vms_show_on_weston_in_gui_vm_through_the_hub() {
    bulkhead_tests::retry_on_emulator_reset(
        "stock_clients_in_app_vms_show_on_weston_in_gui_vm_through_the_hub",
        stock_clients_in_app_vms_show_on_weston_in_gui_vm_through_the_hub_once,
    );
}

fn stock_clients_in_app_vms_show_on_weston_in_gui_vm_through_the_hub_once() {
    let t0 = Instant::now();
    let mut h = Host::boot("wayland");
    h.expect("bulkhead-init: started hub pid");
    h.expect_line_within(
        "the last picture and the power-off",
        Duration::from_secs(1500),
        |l| l.starts_with("screens: after damaged: running /bin/bulkhead-init poweroff"),
    );
    h.expect_end(End::PowerOff);
    eprintln!(
        "the wayland system ran for {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    let lines = h.lines().to_vec();
    // The whole console next to the pictures, for whoever reads a failure.
    let _ = std::fs::write(
        bulkhead_tests::workspace_path("target/bulkhead-tests/wayland/console.txt"),
        lines.join("\n"),
    );
    let line = |prefix: &str| -> String {
        lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("no line starting {prefix:?}\n{}", h.context()))
    };
    let pics = h.pictures();

    // 1. Pixel check: the pattern client's window is at the place weston gives it, exactly,
    //    while stock weston-simple-shm's window (another VM) is mapped too.
    let both = picture(&pics, "both", &h);
    let w = both
        .scene
        .window(pattern::TITLE)
        .unwrap_or_else(|| panic!("no pattern window in:\n{}", both.scene_text));
    assert_eq!(
        (w.width(), w.height()),
        (pattern::WIDTH as i32, pattern::HEIGHT as i32)
    );
    let bad = pattern_mismatches(&both.image, w, false, both.scene.cursor());
    assert_eq!(
        bad, 0,
        "{bad} pixels of the pattern window at ({}, {}) are wrong",
        w.x1, w.y1
    );
    let shm = both
        .scene
        .window("simple-shm")
        .unwrap_or_else(|| panic!("no simple-shm window in:\n{}", both.scene_text));
    assert!(shm.width() > 0 && shm.height() > 0);

    // 2. Kill app-b's VMM mid-frame (simple-shm redraws every frame): init saw it die by
    //    SIGKILL, its window went, weston and app-a went on (later pictures, the click).
    line("screens: after both: killed app-b-vm");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("bulkhead-init: app-b-vm") && l.contains("SIGKILL")),
        "init did not see app-b-vm's VMM killed\n{}",
        h.context()
    );
    let before = picture(&pics, "before", &h);
    assert!(
        before.scene.window("simple-shm").is_none(),
        "{}",
        before.scene_text
    );
    let w_before = before
        .scene
        .window(pattern::TITLE)
        .unwrap_or_else(|| panic!("the pattern window went:\n{}", before.scene_text));
    assert_eq!(
        pattern_mismatches(&before.image, w_before, false, before.scene.cursor()),
        0,
        "the pattern window after the kill"
    );
    let weston_gone = lines.iter().position(|l| {
        l.starts_with("gui-vm: bulkhead-guest-init: weston exited")
            || l.starts_with("gui-vm: bulkhead-guest-init: weston killed")
    });
    let last_pic = lines
        .iter()
        .position(|l| l.starts_with("screens: passed on png damaged"))
        .unwrap_or_else(|| panic!("no last picture\n{}", h.context()));
    assert!(
        weston_gone.is_none_or(|i| i > last_pic),
        "weston ended before the last picture"
    );

    // 3. Damage: the click changed one rectangle; the next picture differs there and nowhere
    //    else, and the proxy copied exactly that rectangle's bytes for the commit.
    let damaged = picture(&pics, "damaged", &h);
    let w_after = damaged.scene.window(pattern::TITLE).unwrap_or_else(|| {
        panic!(
            "the pattern window in the last picture:\n{}",
            damaged.scene_text
        )
    });
    assert_eq!((w_after.x1, w_after.y1), (w_before.x1, w_before.y1));
    assert_eq!(
        pattern_mismatches(&damaged.image, w_after, true, damaged.scene.cursor()),
        0,
        "the changed pattern"
    );
    let (cx, cy, cw, ch) = pattern::CHANGED;
    let diff = differences(&before.image, &damaged.image);
    assert_eq!(diff.len() as u32, cw * ch, "pixels changed: {}", diff.len());
    for (x, y) in &diff {
        let (wx, wy) = (*x as i32 - w_after.x1, *y as i32 - w_after.y1);
        assert!(
            wx >= 0 && wy >= 0 && pattern::in_changed(wx as u32, wy as u32),
            "({x}, {y}) changed outside the rectangle"
        );
    }
    let copied = line("app-a-vm: pattern: clicked: changed rectangle");
    let want = format!(
        "changed rectangle ({cx}, {cy}) {cw}x{ch}; the proxy copied {} bytes for that commit",
        cw * ch * 4
    );
    assert!(copied.ends_with(&want), "{copied}\nwanted …{want}");

    // 4. Clipboard across VMs: app-b's stock wl-copy, app-a's stock wl-paste.
    let token = line("app-b-vm: copy: copying ");
    let token = token.rsplit(' ').next().unwrap_or_default().to_string();
    assert_eq!(token.len(), 16, "{token}");
    line(&format!("app-a-vm: paste: pasted {token}"));
    // Across VMs means between the two clients: weston hands wl-paste's pipe to wl-copy's
    // connection, and neither side's proxy may end a connection over it (a received pipe
    // sent on as it is was refused by the device, and the gui proxy then closed wl-copy's
    // connection: the paste only came from weston's own clipboard copy).
    let broken: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("gui-vm: proxy: ") && l.contains(": closed (connection: "))
        .collect();
    assert!(broken.is_empty(), "{broken:?}");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("app-b-vm: copy: ") && l.contains("Broken pipe")),
        "wl-copy lost its connection"
    );

    // 5. No grant: app-c gets no window, its proxy says why, one audit record names the
    //    missing grant.
    line("app-c-vm: proxy: error: cannot connect to wayland@gui-vm");
    for p in &pics {
        assert!(
            p.scene.window("Flower").is_none(),
            "{}: app-c has a window",
            p.name
        );
    }
    let audit: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.starts_with("screens: #") && l.contains(" DENY app-c-vm connect wayland@gui-vm")
        })
        .collect();
    assert_eq!(audit.len(), 1, "{audit:?}\n{}", h.context());
    assert!(audit[0].contains("NoGrant"), "{}", audit[0]);
    assert!(
        !audit[0].contains("similar"),
        "one refusal, not several: {}",
        audit[0]
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("screens: #") && l.contains("DENY app-a-vm")),
        "app-a was refused\n{}",
        h.context()
    );
}
