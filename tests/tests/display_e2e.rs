//! A screen passed through by VFIO, and wiped between its owners (`tests/systems/display`):
//! QEMU's bochs-display in the emulated host belongs to screen-vm, whose L2 guest draws
//! colour bars on it. Every picture is QEMU's own (QMP `screendump` of the emulated host's
//! screen); the guest's line only says when to take one.
//!
//! The VMM writes zeros over a display controller's prefetchable BARs (framebuffer, video
//! memory) when it takes the device and again at its orderly end: neither the device's reset
//! (bochs-display has none of its own; real GPUs keep video memory too) nor a killed VMM may
//! leave one owner's picture to the next.

use bulkhead_rootfs::screens::Image;
use bulkhead_tests::{BootOptions, End, Host};

const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;
/// What the guest draws (`bulkhead-testprog screen-draw`): eight bars, 80 pixels wide each.
const BARS: [[u8; 3]; 8] = [
    [0xff, 0, 0],
    [0, 0xff, 0],
    [0, 0, 0xff],
    [0xff, 0xff, 0xff],
    [0xff, 0xff, 0],
    [0, 0xff, 0xff],
    [0xff, 0, 0xff],
    [0x80, 0x80, 0x80],
];
const WIPE_AT_START: &str =
    "screen-vm: bulkhead-vmm: INFO: vfio 0000:02:00.0: BAR 0 wiped at VM start";
const WIPE_AT_END: &str = "screen-vm: bulkhead-vmm: INFO: vfio 0000:02:00.0: BAR 0 wiped at VM end";
const DREW: &str = "screen-vm: draw: testprog: screen: drew 8 bars at 640x480";

/// Pixels of `img` that are not the bars.
fn not_bars(img: &Image) -> usize {
    if (img.width, img.height) != (WIDTH, HEIGHT) {
        return (WIDTH * HEIGHT) as usize;
    }
    let mut bad = 0;
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let want = BARS[(x / (WIDTH / 8)) as usize];
            let got = img.pixel(i64::from(x), i64::from(y));
            if got.map(|p| [p[0], p[1], p[2]]) != Some(want) {
                bad += 1;
            }
        }
    }
    bad
}

#[test]
fn a_screen_passed_through_is_wiped_before_its_next_owner_even_after_a_killed_vmm() {
    bulkhead_tests::retry_on_emulator_reset(
        "a_screen_passed_through_is_wiped_before_its_next_owner_even_after_a_killed_vmm",
        a_screen_passed_through_is_wiped_before_its_next_owner_even_after_a_killed_vmm_once,
    );
}

fn a_screen_passed_through_is_wiped_before_its_next_owner_even_after_a_killed_vmm_once() {
    let mut h = Host::boot_with(
        "display",
        BootOptions {
            display: true,
            restarts_allowed: vec!["screen-vm".into()],
            ..Default::default()
        },
    );
    h.expect("killer: testprog: screen-killer: waiting for k on /dev/input/event");
    h.expect(WIPE_AT_START);
    h.expect(DREW);
    let drawn = h.screendump("1-drawn");
    assert_eq!(
        not_bars(&drawn),
        0,
        "the guest's bars are not on the screen ({}x{})\n{}",
        drawn.width,
        drawn.height,
        h.context()
    );

    // SIGKILL: the VMM's own end (reset, wipe) never runs.
    h.kill_by_key("screen-vm");
    let left = h.screendump("2-after-kill");
    assert_eq!(
        not_bars(&left),
        0,
        "the killed owner's picture should still be in the device (nothing else wipes it), \
         or this test proves nothing"
    );

    // The next owner: its VMM wipes before its guest runs.
    h.expect(WIPE_AT_START);
    h.assert_screen_black(
        "3-next-owner",
        "of the last owner's picture reached the next",
    );
    // (Had the new guest drawn before this picture, it would show its bars, not black.)

    // Its guest draws, ends in order, and the VMM wipes at its end.
    h.expect(DREW);
    h.expect(WIPE_AT_END);
    h.assert_screen_black("4-ended", "left after the VMM's orderly end");
    h.expect_end(End::PowerOff);
}
