//! The GUI VM owns the screen (`tests/systems/gui-display`): QEMU's bochs-display in the
//! emulated host belongs to gui-vm by VFIO; its guest runs Debian's generic kernel with the
//! bochs DRM driver and stock weston on its DRM backend. app-vm's windows (the pattern
//! client, stock weston-simple-shm) reach that weston through the hub, unchanged.
//!
//! Every verdict is about QEMU's own picture of the emulated host's screen (QMP
//! `screendump`). Weston's screenshot and scene graph, sent by gui-vm's agent, say where the
//! windows are and when to look (a guest could lie about those; it cannot change what QEMU
//! shows). Then gui-vm's VMM is killed (a key on the emulated host's keyboard, for the
//! `killer` service), and the screen must be black when init's next gui-vm takes it, before
//! its weston draws again; app-vm's clients, whose VM was not restarted, then come back to
//! that weston by themselves.

use bulkhead_desktop::pattern;
use bulkhead_desktop::scene::View;
use bulkhead_rootfs::screens::{Image, Picture};
use bulkhead_tests::{BootOptions, Host};

const WIPE_AT_START: &str =
    "gui-vm: bulkhead-vmm: INFO: vfio 0000:02:00.0: BAR 0 wiped at VM start";
const SHOT_DESKTOP: &str = "screens: passed on png desktop";
const SHOT_BOTH: &str = "screens: passed on png both";

fn inside(v: &View, x: i64, y: i64) -> bool {
    x >= i64::from(v.x1) && x < i64::from(v.x2) && y >= i64::from(v.y1) && y < i64::from(v.y2)
}

/// Pixels of the pattern window `w` on `screen` that are not the pattern.
fn pattern_mismatches(screen: &Image, w: &View) -> usize {
    let mut bad = 0;
    for y in 0..pattern::HEIGHT {
        for x in 0..pattern::WIDTH {
            let (sx, sy) = (
                i64::from(w.x1) + i64::from(x),
                i64::from(w.y1) + i64::from(y),
            );
            match screen.pixel(sx, sy) {
                Some([r, g, b, _]) if [r, g, b] == pattern::rgb(x, y, false) => {}
                _ => bad += 1,
            }
        }
    }
    bad
}

/// Pixels where `screen` and weston's `shot` differ (RGB), outside `skip`.
fn differences(screen: &Image, shot: &Image, skip: &[&View]) -> usize {
    if (screen.width, screen.height) != (shot.width, shot.height) {
        return (screen.width * screen.height).max(1) as usize;
    }
    let mut n = 0;
    for y in 0..i64::from(screen.height) {
        for x in 0..i64::from(screen.width) {
            if skip.iter().any(|v| inside(v, x, y)) {
                continue;
            }
            let rgb = |p: Option<[u8; 4]>| p.map(|p| [p[0], p[1], p[2]]);
            if rgb(screen.pixel(x, y)) != rgb(shot.pixel(x, y)) {
                n += 1;
            }
        }
    }
    n
}

fn last_picture(h: &Host, name: &str) -> Picture {
    h.pictures()
        .into_iter()
        .rfind(|p| p.name == name)
        .unwrap_or_else(|| panic!("no picture {name} from gui-vm's agent\n{}", h.context()))
}

/// The pattern window and simple-shm's in weston's picture `p`, checked on `screen` (QEMU's
/// screendump, called `what` in failures): the pattern pixel for pixel where weston's scene
/// puts it, and everything but simple-shm's window (it draws a new frame every refresh)
/// what weston rendered: its background, panel and the pattern.
fn weston_picture_on_screen<'a>(
    screen: &Image,
    p: &'a Picture,
    what: &str,
) -> (&'a View, &'a View) {
    let window = |title: &str| {
        p.scene
            .window(title)
            .unwrap_or_else(|| panic!("no {title:?} window for {what} in:\n{}", p.scene_text))
    };
    let (w, shm) = (window(pattern::TITLE), window("simple-shm"));
    let bad = pattern_mismatches(screen, w);
    assert_eq!(
        bad, 0,
        "{bad} pixels of the pattern window at ({}, {}) on {what} are wrong",
        w.x1, w.y1
    );
    let diff = differences(screen, &p.image, &[shm]);
    assert_eq!(diff, 0, "{diff} pixels of {what} are not weston's picture");
    (w, shm)
}

#[test]
fn gui_vm_drives_the_screen_a_restart_wipes_it_and_the_windows_come_back() {
    bulkhead_tests::retry_on_emulator_reset(
        "gui_vm_drives_the_screen_a_restart_wipes_it_and_the_windows_come_back",
        gui_vm_drives_the_screen_a_restart_wipes_it_and_the_windows_come_back_once,
    );
}

fn gui_vm_drives_the_screen_a_restart_wipes_it_and_the_windows_come_back_once() {
    let mut h = Host::boot_with(
        "gui-display",
        BootOptions {
            display: true,
            restarts_allowed: vec!["gui-vm".into()],
            ..Default::default()
        },
    );
    h.expect("bulkhead-init: started hub pid");
    h.expect("killer: testprog: screen-killer: waiting for k on /dev/input/event");
    h.expect(WIPE_AT_START);

    // 1. app-vm's two windows on the screen weston drives.
    h.expect_within(SHOT_BOTH, std::time::Duration::from_secs(1500));
    let screen = h.screendump("1-both");
    let both = last_picture(&h, "both");
    assert_eq!(
        (screen.width, screen.height),
        (both.image.width, both.image.height),
        "the screen's mode is not weston's output"
    );
    let (w, shm) = weston_picture_on_screen(&screen, &both, "the screen");
    // The stock client's window is there: its pixels are not the desktop behind it.
    let desktop = last_picture(&h, "desktop");
    let mut covered = 0usize;
    let mut total = 0usize;
    for y in i64::from(shm.y1)..i64::from(shm.y2) {
        for x in i64::from(shm.x1)..i64::from(shm.x2) {
            total += 1;
            if screen.pixel(x, y) != desktop.image.pixel(x, y) {
                covered += 1;
            }
        }
    }
    assert!(
        total > 0 && covered * 2 > total,
        "simple-shm's window ({}x{} at {}, {}) is not on the screen: {covered} of {total} \
         pixels differ from the desktop",
        shm.width(),
        shm.height(),
        shm.x1,
        shm.y1
    );

    // 2. SIGKILL gui-vm's VMM: its own end (reset, wipe) never runs.
    h.kill_by_key("gui-vm");
    let left = h.screendump("2-after-kill");
    assert_eq!(
        pattern_mismatches(&left, w),
        0,
        "the killed owner's picture should still be in the device (nothing else wipes it), \
         or the next check proves nothing"
    );

    // 3. init's next gui-vm: its VMM wipes the screen before its guest runs.
    h.expect(WIPE_AT_START);
    h.assert_screen_black(
        "3-next-owner",
        "of the last owner's picture reached the next",
    );

    // 4. ... and its weston draws on it again.
    h.expect_within(SHOT_DESKTOP, std::time::Duration::from_secs(900));
    let again = h.screendump("4-weston-again");
    let lit = again.lit_pixels();
    assert!(
        lit * 2 > (again.width * again.height) as usize,
        "weston of the restarted gui-vm did not draw on the screen ({lit} pixels lit)"
    );

    // 5. app-vm's clients come back to the new weston by themselves (their VM was never
    //    restarted): both windows on the screen again, the pattern pixel for pixel.
    h.expect_within(SHOT_BOTH, std::time::Duration::from_secs(600));
    let back = h.screendump("5-windows-back");
    let both = last_picture(&h, "both");
    weston_picture_on_screen(&back, &both, "the restarted gui-vm's screen");
}
