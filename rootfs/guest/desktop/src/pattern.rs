//! The exact picture `bulkhead-wl-click-pattern` draws, shared with the tests that look for it in
//! a screenshot: every pixel is a function of its place in the window, so a window shown one
//! pixel off, scaled, or with stale bytes does not match.

/// The window's size.
pub const WIDTH: u32 = 240;
pub const HEIGHT: u32 = 180;

/// The window's title (how tests find it in weston's scene).
pub const TITLE: &str = "bulkhead-pattern";

/// The rectangle that changes when the window is clicked: x, y, width, height.
pub const CHANGED: (u32, u32, u32, u32) = (90, 60, 60, 40);

/// True if (x, y) is inside [`CHANGED`].
pub fn in_changed(x: u32, y: u32) -> bool {
    let (cx, cy, cw, ch) = CHANGED;
    x >= cx && x < cx + cw && y >= cy && y < cy + ch
}

/// The colour (r, g, b) of window pixel (x, y), before the click (`changed` false) or after.
pub fn rgb(x: u32, y: u32, changed: bool) -> [u8; 3] {
    let r = ((x * 17 + y * 3) % 256) as u8;
    let g = ((y * 13 + x * 5) % 256) as u8;
    let b = if (x / 30 + y / 30) % 2 == 0 { 40 } else { 200 };
    if changed && in_changed(x, y) {
        [255 - r, 255 - g, 255 - b]
    } else {
        [r, g, b]
    }
}

/// The whole window as XRGB8888 (little-endian: b, g, r, x per pixel).
pub fn xrgb8888(changed: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity((WIDTH * HEIGHT * 4) as usize);
    for y in 0..HEIGHT {
        for x in 0..WIDTH {
            let [r, g, b] = rgb(x, y, changed);
            out.extend_from_slice(&[b, g, r, 0xff]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_differ_and_the_change_is_confined() {
        // A shift by one pixel in either direction never matches.
        for y in 0..HEIGHT - 1 {
            for x in 0..WIDTH - 1 {
                assert_ne!(rgb(x, y, false), rgb(x + 1, y, false), "({x}, {y})");
                assert_ne!(rgb(x, y, false), rgb(x, y + 1, false), "({x}, {y})");
            }
        }
        let (a, b) = (xrgb8888(false), xrgb8888(true));
        let differing = a.chunks(4).zip(b.chunks(4)).filter(|(p, q)| p != q).count();
        assert_eq!(differing as u32, CHANGED.2 * CHANGED.3);
    }
}
