//! A split virtqueue laid out in guest memory the way a guest driver lays it out (the
//! rings' `used_event` and `avail_event` fields included) and filled the way a driver fills
//! it: the driver's side of the notification tests (`wl_event_idx.rs`, `net_event_idx.rs`).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use bulkhead_vmm::vstate::memory::GuestMemoryMmap;

/// Entries per queue.
pub const QSIZE: u16 = 16;
/// The used ring's flag "do not notify me" (the device's word without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// One queue: its descriptor table at `base`, available ring a page up, used ring two.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail: u64,
    used: u64,
    /// The next descriptor [`DriverQueue::post`] writes.
    next_desc: u16,
}

impl<'a> DriverQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        let q = DriverQueue {
            mem,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
        };
        for a in [q.avail, q.used] {
            mem.write_slice(&[0u8; 0x1000], GuestAddress(a)).unwrap();
        }
        q
    }

    /// The device's view of it, ready.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    fn read16(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    fn write16(&self, addr: u64, v: u16) {
        self.mem.write_obj(v.to_le(), GuestAddress(addr)).unwrap();
    }

    /// Writes descriptors `first..` as one chain of (addr, len, device-writable) and makes it
    /// available.
    pub fn add(&self, first: u16, parts: &[(u64, u32, bool)]) {
        for (i, (addr, len, w)) in parts.iter().enumerate() {
            let idx = first + i as u16;
            let last = i + 1 == parts.len();
            let flags = u16::from(*w) * super::WRITE + u16::from(!last) * super::NEXT;
            let d = self.desc + 16 * u64::from(idx);
            self.mem.write_obj(addr.to_le(), GuestAddress(d)).unwrap();
            self.mem
                .write_obj(len.to_le(), GuestAddress(d + 8))
                .unwrap();
            self.write16(d + 12, flags);
            self.write16(d + 14, if last { 0 } else { idx + 1 });
        }
        let idx = self.avail_idx();
        self.write16(self.avail + 4 + 2 * u64::from(idx % QSIZE), first);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Makes one single-descriptor chain available at the next descriptor. Returns whether
    /// the driver would notify the device for it (Linux's `virtqueue_kick_prepare`).
    pub fn post(&mut self, addr: u64, len: u32, writable: bool, event_idx: bool) -> bool {
        let idx = self.next_desc % QSIZE;
        self.next_desc = self.next_desc.wrapping_add(1);
        let old = self.avail_idx();
        self.add(idx, &[(addr, len, writable)]);
        let new = old.wrapping_add(1);
        if event_idx {
            // vring_need_event(avail_event, new, old)
            new.wrapping_sub(self.avail_event()).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.used_flags() & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// The descriptor the next [`DriverQueue::post`] writes.
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    pub fn avail_idx(&self) -> u16 {
        self.read16(self.avail + 2)
    }

    pub fn set_avail_idx(&self, v: u16) {
        self.write16(self.avail + 2, v);
    }

    pub fn used_idx(&self) -> u16 {
        self.read16(self.used + 2)
    }

    pub fn used_flags(&self) -> u16 {
        self.read16(self.used)
    }

    /// Used entry `i`: (descriptor id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let e = self.used + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// `used_event`: the driver's "interrupt me when you use this entry".
    pub fn set_used_event(&self, v: u16) {
        self.write16(self.avail + 4 + 2 * u64::from(QSIZE), v);
    }

    /// `avail_event`: the device's "notify me when you make this entry available".
    pub fn avail_event(&self) -> u16 {
        self.read16(self.used + 4 + 8 * u64::from(QSIZE))
    }
}
