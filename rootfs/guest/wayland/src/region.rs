//! Damage: a set of rectangles in buffer pixels, and the byte ranges of a buffer they cover.

/// A rectangle in buffer pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left.
    pub x: i64,
    /// Top.
    pub y: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
}

/// Past this many rectangles a region becomes its bounding box (bounded work per commit).
const MAX_RECTS: usize = 64;

/// Damage in buffer pixels: `Full`, or rectangles (overlaps allowed; copied once).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Region {
    /// Nothing.
    #[default]
    Empty,
    /// The whole buffer.
    Full,
    /// These rectangles.
    Rects(Vec<Rect>),
}

impl Region {
    /// Adds a rectangle (ignored when empty).
    pub fn add(&mut self, r: Rect) {
        if r.w <= 0 || r.h <= 0 {
            return;
        }
        match self {
            Region::Full => {}
            Region::Empty => *self = Region::Rects(vec![r]),
            Region::Rects(v) => {
                v.push(r);
                if v.len() > MAX_RECTS {
                    let x0 = v.iter().map(|r| r.x).min().unwrap_or(0);
                    let y0 = v.iter().map(|r| r.y).min().unwrap_or(0);
                    let x1 = v.iter().map(|r| r.x.saturating_add(r.w)).max().unwrap_or(0);
                    let y1 = v.iter().map(|r| r.y.saturating_add(r.h)).max().unwrap_or(0);
                    *v = vec![Rect {
                        x: x0,
                        y: y0,
                        w: x1 - x0,
                        h: y1 - y0,
                    }];
                }
            }
        }
    }

    /// Adds all of `other`.
    pub fn union(&mut self, other: &Region) {
        match other {
            Region::Empty => {}
            Region::Full => *self = Region::Full,
            Region::Rects(v) => {
                for r in v {
                    self.add(*r);
                }
            }
        }
    }

    /// True when nothing is damaged.
    pub fn is_empty(&self) -> bool {
        matches!(self, Region::Empty)
    }
}

/// Where a buffer's pixels are in its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the first row in the pool.
    pub offset: u64,
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Bytes per row.
    pub stride: i64,
    /// Bytes per pixel, when the format is a known packed one; `None` copies whole rows
    /// (and, for formats with more planes, everything after the first row to the pool end).
    pub bpp: Option<i64>,
}

/// The byte ranges `(pool offset, len)` of `region` in a buffer laid out as `l`, clipped to
/// the buffer, each byte once, adjacent ranges merged, clipped to `pool_len`.
pub fn byte_ranges(l: &Layout, region: &Region, pool_len: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |off: i64, len: i64| {
        if len <= 0 || off < 0 {
            return;
        }
        let (off, len) = (off as u64, len as u64);
        if off >= pool_len {
            return;
        }
        let len = len.min(pool_len - off);
        match out.last_mut() {
            Some((o, n)) if *o + *n == off => *n += len,
            _ => out.push((off, len)),
        }
    };
    if l.width <= 0 || l.height <= 0 || l.stride <= 0 {
        return out;
    }
    let base = l.offset as i64;
    let Some(bpp) = l.bpp else {
        // Unknown layout: the whole buffer from its first byte to the pool's end.
        push(base, pool_len as i64 - base);
        return out;
    };
    let row_bytes = (l.width * bpp).min(l.stride);
    let rects: Vec<Rect> = match region {
        Region::Empty => return out,
        Region::Full => vec![Rect {
            x: 0,
            y: 0,
            w: l.width,
            h: l.height,
        }],
        Region::Rects(v) => v.clone(),
    };
    // Clip to the buffer.
    let rects: Vec<(i64, i64, i64, i64)> = rects
        .iter()
        .filter_map(|r| {
            let x0 = r.x.clamp(0, l.width);
            let y0 = r.y.clamp(0, l.height);
            let x1 = r.x.saturating_add(r.w).clamp(0, l.width);
            let y1 = r.y.saturating_add(r.h).clamp(0, l.height);
            (x0 < x1 && y0 < y1).then_some((x0, y0, x1, y1))
        })
        .collect();
    if rects.is_empty() {
        return out;
    }
    // Rows past the pool's end hold nothing to copy: never walk them (a buffer may claim
    // 2^31 rows).
    let rows_in_pool = (pool_len as i64 - base).max(0) / l.stride + 1;
    let ymin = rects.iter().map(|r| r.1).min().unwrap_or(0);
    let ymax = rects
        .iter()
        .map(|r| r.3)
        .max()
        .unwrap_or(0)
        .min(rows_in_pool);
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for y in ymin..ymax {
        spans.clear();
        spans.extend(
            rects
                .iter()
                .filter(|r| r.1 <= y && y < r.3)
                .map(|r| (r.0, r.2)),
        );
        spans.sort_unstable();
        let mut cur: Option<(i64, i64)> = None;
        let row = base + y * l.stride;
        for &(a, b) in spans.iter() {
            cur = match cur {
                Some((c0, c1)) if a <= c1 => Some((c0, c1.max(b))),
                Some((c0, c1)) => {
                    push(row + c0 * bpp, ((c1 - c0) * bpp).min(row_bytes - c0 * bpp));
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((c0, c1)) = cur {
            push(row + c0 * bpp, ((c1 - c0) * bpp).min(row_bytes - c0 * bpp));
        }
    }
    out
}

/// Bytes per pixel of a `wl_shm` format (0 and 1 are ARGB/XRGB8888; the others are DRM
/// fourcc codes). `None` for formats that are not a single packed plane known here.
pub fn bytes_per_pixel(format: u32) -> Option<i64> {
    let fourcc = |s: &[u8; 4]| u32::from_le_bytes(*s);
    match format {
        0 | 1 => Some(4),
        f if [
            b"AR24", b"XR24", b"AB24", b"XB24", b"RA24", b"RX24", b"BA24", b"BX24", b"AR30",
            b"XR30", b"AB30", b"XB30", b"RA30", b"RX30", b"BA30", b"BX30",
        ]
        .iter()
        .any(|c| fourcc(c) == f) =>
        {
            Some(4)
        }
        f if [b"RG24", b"BG24"].iter().any(|c| fourcc(c) == f) => Some(3),
        f if [
            b"RG16", b"BG16", b"AR15", b"XR15", b"AB15", b"XB15", b"AR12", b"XR12", b"AB12",
            b"XB12", b"R16 ", b"GR88",
        ]
        .iter()
        .any(|c| fourcc(c) == f) =>
        {
            Some(2)
        }
        f if [b"C8  ", b"R8  "].iter().any(|c| fourcc(c) == f) => Some(1),
        f if [b"AB4H", b"XB4H", b"AR4H", b"XR4H", b"AB48", b"XB48"]
            .iter()
            .any(|c| fourcc(c) == f) =>
        {
            Some(8)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l() -> Layout {
        Layout {
            offset: 1000,
            width: 100,
            height: 50,
            stride: 400,
            bpp: Some(4),
        }
    }

    fn total(v: &[(u64, u64)]) -> u64 {
        v.iter().map(|r| r.1).sum()
    }

    #[test]
    fn one_rectangle_is_its_bytes_only() {
        let mut r = Region::default();
        r.add(Rect {
            x: 10,
            y: 5,
            w: 20,
            h: 3,
        });
        let v = byte_ranges(&l(), &r, 1 << 20);
        assert_eq!(
            v,
            vec![
                (1000 + 5 * 400 + 40, 80),
                (1000 + 6 * 400 + 40, 80),
                (1000 + 7 * 400 + 40, 80)
            ]
        );
    }

    #[test]
    fn overlaps_count_once_and_full_rows_merge() {
        let mut r = Region::default();
        r.add(Rect {
            x: 0,
            y: 0,
            w: 60,
            h: 10,
        });
        r.add(Rect {
            x: 40,
            y: 5,
            w: 60,
            h: 10,
        });
        let v = byte_ranges(&l(), &r, 1 << 20);
        // rows 0-4: 60 px; rows 5-9: 100 px (whole row); rows 10-14: 60 px
        assert_eq!(total(&v), (5 * 60 + 5 * 100 + 5 * 60) * 4);
        let full = byte_ranges(&l(), &Region::Full, 1 << 20);
        assert_eq!(
            full,
            vec![(1000, 50 * 400)],
            "stride == width*bpp: one range"
        );
    }

    #[test]
    fn out_of_bounds_damage_is_clipped() {
        let mut r = Region::default();
        r.add(Rect {
            x: -50,
            y: -50,
            w: 1_000_000,
            h: 60,
        });
        let v = byte_ranges(&l(), &r, 1 << 20);
        assert_eq!(total(&v), 10 * 100 * 4);
        // A buffer past the pool's end is clipped to the pool.
        let v = byte_ranges(&l(), &Region::Full, 1100);
        assert_eq!(total(&v), 100);
        let mut r = Region::default();
        r.add(Rect {
            x: i64::MAX,
            y: 0,
            w: i64::MAX,
            h: i64::MAX,
        });
        assert!(byte_ranges(&l(), &r, 1 << 20).is_empty());
    }

    #[test]
    fn a_huge_buffer_in_a_small_pool_is_cheap() {
        let l = Layout {
            offset: 0,
            width: 1,
            height: i32::MAX as i64,
            stride: 4,
            bpp: Some(4),
        };
        // Only the 1025 rows that touch the pool are walked (2^31 would take seconds).
        let v = byte_ranges(&l, &Region::Full, 4096);
        assert_eq!(v, vec![(0, 4096)]);
    }

    #[test]
    fn many_rects_collapse_to_their_bounding_box() {
        let mut r = Region::default();
        for i in 0..65 {
            r.add(Rect {
                x: i,
                y: i,
                w: 1,
                h: 1,
            });
        }
        assert_eq!(
            r,
            Region::Rects(vec![Rect {
                x: 0,
                y: 0,
                w: 65,
                h: 65
            }])
        );
    }

    #[test]
    fn formats() {
        assert_eq!(bytes_per_pixel(0), Some(4));
        assert_eq!(bytes_per_pixel(u32::from_le_bytes(*b"RG16")), Some(2));
        assert_eq!(bytes_per_pixel(u32::from_le_bytes(*b"NV12")), None);
    }
}
