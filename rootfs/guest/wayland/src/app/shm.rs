//! Shared memory on the app side: a client's `wl_shm` pool becomes virtio_wl shared memory
//! of the same size, and at each `wl_surface.commit` the proxy copies into it, from the
//! client's own memory, the bytes of the attached buffer that may differ: the damage of this
//! commit and of the commits since that buffer was last copied on that surface (a client
//! that alternates buffers damages each frame relative to the previous one, not relative to
//! what that buffer last held). A buffer never copied before, or last shown on another
//! surface or too long ago, is copied whole.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;

use crate::region::{byte_ranges, bytes_per_pixel, Layout, Rect, Region};
use crate::transport::Mapping;

/// Commits of damage history kept per surface.
const HISTORY: usize = 16;

/// One generation of a pool's memory: the client's fd and the virtio_wl copy.
pub struct PoolMem {
    /// The client's memory (read with `pread`, so a client that shrinks it gets an error,
    /// never the proxy a SIGBUS).
    pub client: OwnedFd,
    /// The shared memory the compositor reads.
    pub map: Mapping,
}

/// A `wl_shm_pool`.
pub struct Pool {
    /// Its current memory (a resize makes a new generation; buffers keep theirs).
    pub mem: Rc<PoolMem>,
    /// Its size in bytes.
    pub size: usize,
    /// The `wl_shm` that made it (to make it again on resize).
    pub shm: u32,
}

/// A `wl_buffer` from a pool.
pub struct Buffer {
    /// The memory it lives in.
    pub mem: Rc<PoolMem>,
    /// Where in it.
    pub layout: Layout,
    /// The surface and commit number at which it was last copied.
    pub synced: Option<(u32, u64)>,
}

impl Buffer {
    /// A buffer from `wl_shm_pool.create_buffer(offset, width, height, stride, format)`.
    pub fn new(
        mem: Rc<PoolMem>,
        offset: i32,
        width: i32,
        height: i32,
        stride: i32,
        format: u32,
    ) -> Self {
        let valid = offset >= 0 && width > 0 && height > 0 && stride > 0;
        Self {
            mem,
            layout: Layout {
                offset: u64::try_from(offset).unwrap_or(0),
                width: if valid { i64::from(width) } else { 0 },
                height: i64::from(height),
                stride: i64::from(stride),
                bpp: bytes_per_pixel(format),
            },
            synced: None,
        }
    }
}

/// The double-buffered state of a `wl_surface` that matters for copying.
#[derive(Default)]
pub struct Surface {
    pending_attach: Option<Option<u32>>,
    pending_damage: Vec<Rect>,
    pending_buffer_damage: Region,
    pending_scale: Option<i32>,
    pending_transform: Option<i32>,
    scale: i32,
    transform: i32,
    /// A wp_viewport was made for it: surface damage cannot be mapped to buffer pixels.
    pub viewport: bool,
    buffer: Option<u32>,
    seq: u64,
    history: VecDeque<(u64, Region)>,
}

impl Surface {
    /// `attach(buffer or null)`.
    pub fn attach(&mut self, buffer: Option<u32>) {
        self.pending_attach = Some(buffer);
    }
    /// `damage` (surface coordinates).
    pub fn damage(&mut self, x: i32, y: i32, w: i32, h: i32) {
        self.pending_damage.push(rect(x, y, w, h));
    }
    /// `damage_buffer` (buffer pixels).
    pub fn damage_buffer(&mut self, x: i32, y: i32, w: i32, h: i32) {
        self.pending_buffer_damage.add(rect(x, y, w, h));
    }
    /// `set_buffer_scale`.
    pub fn set_scale(&mut self, s: i32) {
        self.pending_scale = Some(s);
    }
    /// `set_buffer_transform`.
    pub fn set_transform(&mut self, t: i32) {
        self.pending_transform = Some(t);
    }
    /// A buffer went away: forget it if attached.
    pub fn forget_buffer(&mut self, id: u32) {
        if self.buffer == Some(id) {
            self.buffer = None;
        }
        if self.pending_attach == Some(Some(id)) {
            self.pending_attach = Some(None);
        }
    }
}

fn rect(x: i32, y: i32, w: i32, h: i32) -> Rect {
    Rect {
        x: x.into(),
        y: y.into(),
        w: w.into(),
        h: h.into(),
    }
}

/// Why a commit could not be copied.
#[derive(Debug, thiserror::Error)]
#[error("the client's pool memory could not be read: {0}")]
pub struct CopyError(std::io::Error);

/// Applies a `commit` of surface `sid`: copies what may differ of the attached buffer into
/// shared memory. Returns the bytes copied.
pub fn commit(
    sid: u32,
    s: &mut Surface,
    buffers: &mut HashMap<u32, Buffer>,
) -> Result<u64, CopyError> {
    if let Some(v) = s.pending_scale.take() {
        s.scale = v;
    }
    if let Some(v) = s.pending_transform.take() {
        s.transform = v;
    }
    let mut damage = std::mem::take(&mut s.pending_buffer_damage);
    let surface_damage = std::mem::take(&mut s.pending_damage);
    let scale = i64::from(s.scale.max(1));
    for r in surface_damage {
        if s.transform == 0 && !s.viewport {
            damage.add(Rect {
                x: r.x.saturating_mul(scale),
                y: r.y.saturating_mul(scale),
                w: r.w.saturating_mul(scale),
                h: r.h.saturating_mul(scale),
            });
        } else {
            // Rotated, flipped or scaled by a viewport: copy the whole buffer.
            damage = Region::Full;
        }
    }
    if let Some(a) = s.pending_attach.take() {
        if a.is_none() || s.buffer.is_none() {
            // Unmapped or newly mapped: nothing to diff against.
            damage = Region::Full;
        }
        s.buffer = a;
    }
    s.seq += 1;
    s.history.push_back((s.seq, damage));
    while s.history.len() > HISTORY {
        s.history.pop_front();
    }
    let Some(b) = s.buffer.and_then(|id| buffers.get_mut(&id)) else {
        return Ok(0);
    };
    let oldest = s.history.front().map(|h| h.0).unwrap_or(s.seq);
    let region = match b.synced {
        Some((surf, last)) if surf == sid && last + 1 >= oldest => {
            let mut r = Region::Empty;
            for (_, d) in s.history.iter().filter(|(q, _)| *q > last) {
                r.union(d);
            }
            r
        }
        _ => Region::Full,
    };
    b.synced = Some((sid, s.seq));
    let mem = &b.mem;
    let mut copied = 0u64;
    for (off, len) in byte_ranges(&b.layout, &region, mem.map.len() as u64) {
        let (Ok(at), Ok(n)) = (usize::try_from(off), usize::try_from(len)) else {
            continue;
        };
        let got = mem
            .map
            .fill_from(at, n, mem.client.as_fd(), off)
            .map_err(CopyError)?;
        copied += got as u64;
    }
    Ok(copied)
}
