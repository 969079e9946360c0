//! What the VMM's fuzz targets share: real guest memory (vm-memory's `GuestMemoryMmap`, two
//! regions with a hole between them, so buffers can straddle a region's end), guest
//! addresses chosen the way a hostile guest would (inside memory, at its edges, in the hole,
//! anywhere), and a split virtqueue written into that memory by hand, descriptor by
//! descriptor, as a driver does.

use arbitrary::Arbitrary;
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// The two RAM regions: `[0, 512 KiB)` and `[1 MiB, 1.5 MiB)`.
pub const REGIONS: [(u64, u64); 2] = [(0, 0x8_0000), (0x10_0000, 0x8_0000)];
/// Where commands and data the harness stages go (region 0).
pub const STAGING: u64 = 0x1_0000;
/// How many staging bytes there are.
pub const STAGING_LEN: u64 = 0x3_0000;
/// Where answers go (region 0).
pub const ANSWERS: u64 = 0x4_0000;
/// Where the virtqueues live: queue `n` at `QUEUES + n * 0x4000` (region 0).
pub const QUEUES: u64 = 0x6_0000;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 64;

/// Fresh guest memory (zeroed).
pub fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|(a, l)| (GuestAddress(*a), *l as usize))
        .collect();
    match GuestMemoryMmap::from_ranges(&ranges) {
        Ok(m) => m,
        Err(e) => panic!("guest memory: {e:?}"),
    }
}

/// A guest address as a hostile guest picks it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// In the staging area (where well-formed buffers are).
    Staging(u16),
    /// Anywhere inside one of the two regions.
    InRegion(bool, u32),
    /// A few bytes before the end of a region (straddling it, into the hole or past RAM).
    RegionEnd(bool, u8),
    /// In the hole between the regions, or just past RAM.
    Hole(u16),
    /// Near the top of the 64-bit address space.
    Top(u16),
    /// Any address.
    Any(u64),
}

impl Addr {
    /// The address.
    pub fn get(self) -> u64 {
        match self {
            Addr::Staging(o) => STAGING + u64::from(o) % STAGING_LEN,
            Addr::InRegion(r, o) => {
                let (base, len) = REGIONS[usize::from(r)];
                base + u64::from(o) % len
            }
            Addr::RegionEnd(r, back) => {
                let (base, len) = REGIONS[usize::from(r)];
                base + len - 1 - u64::from(back)
            }
            Addr::Hole(o) => REGIONS[0].1 + u64::from(o),
            Addr::Top(o) => u64::MAX - u64::from(o),
            Addr::Any(a) => a,
        }
    }
}

/// One descriptor as the guest writes it.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    /// Buffer address.
    pub addr: Addr,
    /// Buffer length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// Where `next` points instead of the following descriptor (loops, out of range).
    pub next: Option<u16>,
    /// Other flag bits (INDIRECT among them).
    pub extra_flags: u8,
}

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A split virtqueue in guest memory, filled descriptor by descriptor.
pub struct RawQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl RawQueue {
    /// Queue number `n` (its rings zeroed).
    pub fn new(mem: &GuestMemoryMmap, n: u64) -> RawQueue {
        let base = QUEUES + n * 0x4000;
        let _ = mem.write_slice(&[0u8; 0x4000], GuestAddress(base));
        RawQueue {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device's view of it (ready, all addresses set).
    pub fn queue(&self) -> Queue {
        let mut q = match Queue::new(QUEUE_SIZE) {
            Ok(q) => q,
            Err(e) => panic!("queue: {e:?}"),
        };
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// The device's view of it, resuming where the device stopped last time (at the used
    /// index: each pass of a harness creates the queue anew, as a transport does).
    pub fn queue_resumed(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = self.queue();
        let at = self.used_idx(mem);
        q.set_next_avail(at);
        q.set_next_used(at);
        q
    }

    /// The addresses (desc, avail, used), for a transport.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Writes `descs` as one chain and makes it available. Returns false when the table is
    /// full.
    pub fn push(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> bool {
        let n = descs.len().clamp(1, usize::from(QUEUE_SIZE));
        if usize::from(self.next_desc) + n > usize::from(QUEUE_SIZE) {
            return false;
        }
        let head = self.next_desc;
        for (i, d) in descs.iter().take(n).enumerate() {
            let idx = head + i as u16;
            let last = i + 1 == n;
            let mut flags = u16::from(d.extra_flags) & !(F_NEXT | F_WRITE) & 0xfff8;
            if d.write {
                flags |= F_WRITE;
            }
            let next = match (d.next, last) {
                (Some(to), _) => {
                    flags |= F_NEXT;
                    to
                }
                (None, false) => {
                    flags |= F_NEXT;
                    idx + 1
                }
                (None, true) => 0,
            };
            self.write_desc(mem, idx, d.addr.get(), d.len, flags, next);
        }
        self.next_desc += n as u16;
        self.make_available(mem, head);
        true
    }

    /// Writes a well-formed chain of (address, length, device-writable) buffers.
    pub fn push_plain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> bool {
        let n = bufs.len();
        if n == 0 || usize::from(self.next_desc) + n > usize::from(QUEUE_SIZE) {
            return false;
        }
        let head = self.next_desc;
        for (i, (addr, len, w)) in bufs.iter().enumerate() {
            let idx = head + i as u16;
            let mut flags = if *w { F_WRITE } else { 0 };
            let next = if i + 1 < n {
                flags |= F_NEXT;
                idx + 1
            } else {
                0
            };
            self.write_desc(mem, idx, *addr, *len, flags, next);
        }
        self.next_desc += n as u16;
        self.make_available(mem, head);
        true
    }

    /// Makes a head index the guest chose available (any number, even out of range).
    pub fn push_head(&mut self, mem: &GuestMemoryMmap, head: u16) {
        self.make_available(mem, head);
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + u64::from(idx) * 16;
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&b, GuestAddress(at));
    }

    fn make_available(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        let _ = mem.write_obj(head, GuestAddress(self.avail + 4 + slot * 2));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// How many chains the device has returned.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// Used element `i`: (head, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(i % QUEUE_SIZE) * 8;
        (
            mem.read_obj(GuestAddress(at)).unwrap_or(0),
            mem.read_obj(GuestAddress(at + 4)).unwrap_or(0),
        )
    }

    /// Starts again from an empty table (the guest reuses its descriptors).
    pub fn recycle(&mut self) {
        self.next_desc = 0;
    }
}

/// The number of open file descriptors of this process (the fuzzer is single-threaded, so
/// a target can check that an input leaks none).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}
