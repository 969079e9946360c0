//! One ring's producer and consumer. Each keeps its own position and only publishes it;
//! what it reads from the peer is checked before use.

use std::sync::atomic::{fence, Ordering};

use crate::layout::{
    RingInfo, CTL_CONS, CTL_KICK_AT, CTL_PROD, CTL_SPACE_AT, MAX_PAYLOAD, RECORD_HEADER,
};
use crate::mem::Mem;
use crate::RingError;

/// Which ring: TX carries the app VM's frames to the net VM, RX the other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// App VM → net VM (the VMM produces, netd consumes).
    Tx,
    /// Net VM → app VM (netd produces, the VMM consumes).
    Rx,
}

const KIND_FRAME: u32 = 1;
const KIND_PAD: u32 = 2;

/// virtio's `vring_need_event`: has the position moved from `old` to `new` past `event`?
pub fn need_event(event: u32, new: u32, old: u32) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn round8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

#[derive(Debug, Clone, Copy)]
struct View {
    mem: Mem,
    ctl: usize,
    data: usize,
    size: usize,
}

impl View {
    fn new(mem: Mem, info: &RingInfo, side: Side) -> Self {
        let (ctl, data) = info.offsets(side);
        Self {
            mem,
            ctl,
            data,
            size: info.data_size,
        }
    }

    fn load(&self, field: usize) -> Result<u32, RingError> {
        Ok(self
            .mem
            .atomic_u32(self.ctl + field)?
            .load(Ordering::Acquire))
    }

    fn store(&self, field: usize, v: u32) -> Result<(), RingError> {
        self.mem
            .atomic_u32(self.ctl + field)?
            .store(v, Ordering::Release);
        Ok(())
    }

    fn offset(&self, pos: u32) -> usize {
        pos as usize & (self.size - 1)
    }

    /// Bytes between `behind` and `ahead`, checked against the ring's size and alignment.
    fn distance(&self, ahead: u32, behind: u32, what: &str) -> Result<usize, RingError> {
        let d = ahead.wrapping_sub(behind) as usize;
        if d > self.size || d % 8 != 0 {
            return Err(RingError::Corrupt(format!(
                "{what}: {d} bytes between positions {behind:#x} and {ahead:#x} in a {}-byte ring",
                self.size
            )));
        }
        Ok(d)
    }
}

/// Space reserved for one record, to be filled through [`Reservation::ptr`] and then
/// committed (or abandoned by dropping it).
#[derive(Debug)]
pub struct Reservation {
    ptr: *mut u8,
    len: usize,
    /// The record's header offset in the mapping.
    header: usize,
    /// The position after a pad record, if one goes first.
    start: u32,
}

impl Reservation {
    /// Where the payload goes: `len()` writable bytes of the shared mapping.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// The payload bytes reserved.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing was reserved.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The producing side of one ring.
#[derive(Debug)]
pub struct Producer {
    v: View,
    prod: u32,
    /// The position at the last doorbell check.
    checked: u32,
}

impl Producer {
    /// The producer of ring `side` of a ring laid out as `info` in `mem`.
    pub fn new(mem: Mem, info: &RingInfo, side: Side) -> Self {
        Self {
            v: View::new(mem, info, side),
            prod: 0,
            checked: 0,
        }
    }

    /// Reserves room for a `len`-byte payload. `Ok(None)`: the ring is full now (see
    /// [`Producer::wait_for_space`]).
    pub fn reserve(&mut self, len: usize) -> Result<Option<Reservation>, RingError> {
        if len > MAX_PAYLOAD {
            return Err(RingError::TooLarge(len));
        }
        let cons = self.v.load(CTL_CONS)?;
        let used = self.v.distance(self.prod, cons, "consumer position")?;
        let free = self.v.size - used;
        let total = RECORD_HEADER + round8(len);
        let off = self.v.offset(self.prod);
        let to_end = self.v.size - off;
        let (header, start) = if total <= to_end {
            if total > free {
                return Ok(None);
            }
            (off, self.prod)
        } else {
            if to_end + total > free {
                return Ok(None);
            }
            // A pad record fills the end; the record starts at the ring's beginning. Both
            // become visible at commit.
            let pad = self.v.data + off;
            self.v.mem.write_u32(pad, (to_end - RECORD_HEADER) as u32)?;
            self.v.mem.write_u32(pad + 4, KIND_PAD)?;
            (0, self.prod.wrapping_add(to_end as u32))
        };
        let header = self.v.data + header;
        let ptr = self
            .v
            .mem
            .ptr(header + RECORD_HEADER, len)
            .ok_or_else(|| RingError::Map("reservation outside the mapping".into()))?;
        Ok(Some(Reservation {
            ptr,
            len,
            header,
            start,
        }))
    }

    /// Publishes a reserved record with its first `len` payload bytes (at most what was
    /// reserved).
    pub fn commit(&mut self, r: Reservation, len: usize) -> Result<(), RingError> {
        let len = len.min(r.len);
        self.v.mem.write_u32(r.header, len as u32)?;
        self.v.mem.write_u32(r.header + 4, KIND_FRAME)?;
        self.prod = r.start.wrapping_add((RECORD_HEADER + round8(len)) as u32);
        self.v.store(CTL_PROD, self.prod)
    }

    /// Copies `payload` into the ring as one record. `Ok(false)`: full, nothing written.
    pub fn push(&mut self, payload: &[u8]) -> Result<bool, RingError> {
        let Some(r) = self.reserve(payload.len())? else {
            return Ok(false);
        };
        // SAFETY: `r.ptr()` has `r.len()` == `payload.len()` bytes of the mapping reserved
        // for this record; `payload` is ours and does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), r.ptr(), payload.len()) };
        self.commit(r, payload.len())?;
        Ok(true)
    }

    /// After a batch: does the consumer want a doorbell for what was published since the
    /// last check (it went to sleep at a position the batch passed)?
    pub fn kick_needed(&mut self) -> Result<bool, RingError> {
        fence(Ordering::SeqCst);
        let kick_at = self.v.load(CTL_KICK_AT)?;
        let need = need_event(kick_at, self.prod, self.checked);
        self.checked = self.prod;
        Ok(need)
    }

    /// The ring was full: asks the consumer for a doorbell when it frees space, then
    /// checks again. `Ok(true)`: there is room now after all (no need to wait).
    pub fn wait_for_space(&mut self, len: usize) -> Result<bool, RingError> {
        let cons = self.v.load(CTL_CONS)?;
        self.v.store(CTL_SPACE_AT, cons)?;
        fence(Ordering::SeqCst);
        self.has_room(len)
    }

    fn has_room(&self, len: usize) -> Result<bool, RingError> {
        let cons = self.v.load(CTL_CONS)?;
        let used = self.v.distance(self.prod, cons, "consumer position")?;
        let free = self.v.size - used;
        let total = RECORD_HEADER + round8(len.min(MAX_PAYLOAD));
        let to_end = self.v.size - self.v.offset(self.prod);
        Ok(if total <= to_end {
            total <= free
        } else {
            to_end + total <= free
        })
    }

    /// Bytes published and not yet consumed (checked).
    pub fn pending(&self) -> Result<usize, RingError> {
        let cons = self.v.load(CTL_CONS)?;
        self.v.distance(self.prod, cons, "consumer position")
    }
}

/// One record to consume: `len()` payload bytes at [`Record::ptr`] in the shared mapping.
#[derive(Debug)]
pub struct Record {
    ptr: *mut u8,
    len: usize,
    /// The position after this record.
    next: u32,
}

impl Record {
    /// The payload in the shared mapping (the peer could still write it: copy it out, or
    /// hand it to a system call, then validate what was copied).
    pub fn ptr(&self) -> *const u8 {
        self.ptr
    }
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies the payload out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len];
        // SAFETY: `ptr` has `len` bytes inside the mapping (checked when the record was
        // read); `v` is ours.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, v.as_mut_ptr(), self.len) };
        v
    }
}

/// The consuming side of one ring.
#[derive(Debug)]
pub struct Consumer {
    v: View,
    cons: u32,
    /// The position at the last space check.
    checked: u32,
}

impl Consumer {
    /// The consumer of ring `side` of a ring laid out as `info` in `mem`.
    pub fn new(mem: Mem, info: &RingInfo, side: Side) -> Self {
        Self {
            v: View::new(mem, info, side),
            cons: 0,
            checked: 0,
        }
    }

    /// The next record, if one is published (pad records are skipped).
    pub fn peek(&mut self) -> Result<Option<Record>, RingError> {
        loop {
            let prod = self.v.load(CTL_PROD)?;
            let avail = self.v.distance(prod, self.cons, "producer position")?;
            if avail == 0 {
                return Ok(None);
            }
            let off = self.v.offset(self.cons);
            let to_end = self.v.size - off;
            if avail < RECORD_HEADER {
                return Err(RingError::Corrupt(format!(
                    "{avail} bytes: less than a header"
                )));
            }
            let len = self.v.mem.read_u32(self.v.data + off)? as usize;
            let kind = self.v.mem.read_u32(self.v.data + off + 4)?;
            match kind {
                KIND_PAD => {
                    if to_end > avail {
                        return Err(RingError::Corrupt(format!(
                            "a pad of {to_end} bytes with {avail} published"
                        )));
                    }
                    self.cons = self.cons.wrapping_add(to_end as u32);
                    self.v.store(CTL_CONS, self.cons)?;
                }
                KIND_FRAME => {
                    if len > MAX_PAYLOAD {
                        return Err(RingError::Corrupt(format!("a {len}-byte record")));
                    }
                    let total = RECORD_HEADER + round8(len);
                    if total > to_end || total > avail {
                        return Err(RingError::Corrupt(format!(
                            "a {len}-byte record at offset {off:#x} with {avail} published"
                        )));
                    }
                    let ptr = self
                        .v
                        .mem
                        .ptr(self.v.data + off + RECORD_HEADER, len)
                        .ok_or_else(|| RingError::Corrupt("record outside the mapping".into()))?;
                    return Ok(Some(Record {
                        ptr,
                        len,
                        next: self.cons.wrapping_add(total as u32),
                    }));
                }
                k => return Err(RingError::Corrupt(format!("record kind {k}"))),
            }
        }
    }

    /// Frees `r` (the next record from [`Consumer::peek`]) for the producer.
    pub fn pop(&mut self, r: Record) -> Result<(), RingError> {
        self.cons = r.next;
        self.v.store(CTL_CONS, self.cons)
    }

    /// After a batch: does the producer want a doorbell for the space freed since the last
    /// check?
    pub fn space_kick_needed(&mut self) -> Result<bool, RingError> {
        fence(Ordering::SeqCst);
        let at = self.v.load(CTL_SPACE_AT)?;
        let need = need_event(at, self.cons, self.checked);
        self.checked = self.cons;
        Ok(need)
    }

    /// About to sleep: asks the producer for a doorbell when it publishes more, then
    /// checks again. `Ok(true)`: the ring is still empty (sleep); `Ok(false)`: something
    /// arrived meanwhile.
    pub fn prepare_sleep(&mut self) -> Result<bool, RingError> {
        self.v.store(CTL_KICK_AT, self.cons)?;
        fence(Ordering::SeqCst);
        let prod = self.v.load(CTL_PROD)?;
        Ok(self.v.distance(prod, self.cons, "producer position")? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{attach, create, ring_len, MIN_DATA_SIZE};
    use std::ptr::NonNull;

    struct Buf(Vec<u64>);
    impl Buf {
        fn new(data_size: usize) -> Self {
            Buf(vec![0u64; ring_len(data_size) / 8])
        }
        fn mem(&mut self) -> Mem {
            let len = self.0.len() * 8;
            let p = NonNull::new(self.0.as_mut_ptr().cast::<u8>()).unwrap();
            // SAFETY: the buffer lives for the test and is 8-aligned.
            unsafe { Mem::new(p, len) }
        }
    }

    fn pair(b: &mut Buf, side: Side) -> (Producer, Consumer) {
        let mem = b.mem();
        let info = create(mem, MIN_DATA_SIZE, [2, 0, 0, 0, 0, 1]).unwrap();
        let seen = attach(mem).unwrap();
        assert_eq!(info, seen);
        (
            Producer::new(mem, &info, side),
            Consumer::new(mem, &seen, side),
        )
    }

    #[test]
    fn records_come_out_in_order_across_many_wraps() {
        let mut b = Buf::new(MIN_DATA_SIZE);
        for side in [Side::Tx, Side::Rx] {
            let (mut p, mut c) = pair(&mut b, side);
            let mut next_in = 0u32;
            let mut next_out = 0u32;
            let sizes = [0usize, 1, 7, 8, 60, 1514, 9000, MAX_PAYLOAD, 4093];
            for round in 0..500 {
                // Fill until full, then drain part of it.
                loop {
                    let len = sizes[next_in as usize % sizes.len()];
                    let mut payload = vec![0u8; len];
                    for (i, x) in payload.iter_mut().enumerate() {
                        *x = (next_in as usize + i) as u8;
                    }
                    if !p.push(&payload).unwrap() {
                        break;
                    }
                    next_in += 1;
                }
                let take = if round % 3 == 0 { usize::MAX } else { 3 };
                for _ in 0..take {
                    let Some(r) = c.peek().unwrap() else { break };
                    let len = sizes[next_out as usize % sizes.len()];
                    let v = r.to_vec();
                    assert_eq!(v.len(), len);
                    for (i, x) in v.iter().enumerate() {
                        assert_eq!(*x, (next_out as usize + i) as u8);
                    }
                    c.pop(r).unwrap();
                    next_out += 1;
                }
            }
            assert!(next_out > 1_000, "{next_out}");
        }
    }

    #[test]
    fn doorbells_only_at_sleep_boundaries() {
        let mut b = Buf::new(MIN_DATA_SIZE);
        let (mut p, mut c) = pair(&mut b, Side::Tx);
        // The consumer starts asleep at 0: the first batch rings.
        assert!(p.push(b"one").unwrap());
        assert!(p.push(b"two").unwrap());
        assert!(p.kick_needed().unwrap());
        // Awake consumer (it has not gone to sleep again): no doorbell.
        assert!(p.push(b"three").unwrap());
        assert!(!p.kick_needed().unwrap());
        while let Some(r) = c.peek().unwrap() {
            c.pop(r).unwrap();
        }
        assert!(c.prepare_sleep().unwrap(), "empty: may sleep");
        assert!(p.push(b"four").unwrap());
        assert!(p.kick_needed().unwrap(), "it slept: ring");
        assert!(!p.kick_needed().unwrap(), "once");
        // Something published between kick_at and the check: the consumer does not sleep.
        let r = c.peek().unwrap().unwrap();
        c.pop(r).unwrap();
        assert!(p.push(b"five").unwrap());
        assert!(!c.prepare_sleep().unwrap());
    }

    #[test]
    fn a_full_ring_asks_for_space_and_gets_a_doorbell() {
        let mut b = Buf::new(MIN_DATA_SIZE);
        let (mut p, mut c) = pair(&mut b, Side::Rx);
        let big = vec![7u8; 60_000];
        while p.push(&big).unwrap() {}
        assert!(!p.wait_for_space(big.len()).unwrap());
        // Consuming everything passes space_at.
        let mut freed = false;
        while let Some(r) = c.peek().unwrap() {
            c.pop(r).unwrap();
            if c.space_kick_needed().unwrap() {
                freed = true;
            }
        }
        assert!(freed);
        assert!(p.push(&big).unwrap());
    }

    #[test]
    fn a_lying_peer_is_reported_not_followed() {
        let mut b = Buf::new(MIN_DATA_SIZE);
        let (mut p, mut c) = pair(&mut b, Side::Tx);
        let mem = b.mem();
        let info = attach(mem).unwrap();
        let (ctl, data) = info.offsets(Side::Tx);
        // Producer claims more than the ring holds.
        mem.atomic_u32(ctl + CTL_PROD)
            .unwrap()
            .store(MIN_DATA_SIZE as u32 + 8, Ordering::SeqCst);
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        // Misaligned.
        mem.atomic_u32(ctl + CTL_PROD)
            .unwrap()
            .store(12, Ordering::SeqCst);
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        // A record longer than what was published, or than the ring's end.
        mem.atomic_u32(ctl + CTL_PROD)
            .unwrap()
            .store(16, Ordering::SeqCst);
        mem.write_u32(data, 100).unwrap();
        mem.write_u32(data + 4, KIND_FRAME).unwrap();
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        mem.write_u32(data, u32::MAX).unwrap();
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        mem.write_u32(data + 4, 99).unwrap();
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        // A pad past what was published.
        mem.write_u32(data + 4, KIND_PAD).unwrap();
        assert!(matches!(c.peek(), Err(RingError::Corrupt(_))));
        // A consumer position ahead of the producer's.
        mem.atomic_u32(ctl + CTL_CONS)
            .unwrap()
            .store(64, Ordering::SeqCst);
        assert!(matches!(p.reserve(10), Err(RingError::Corrupt(_))));
        assert!(matches!(
            p.reserve(MAX_PAYLOAD + 1),
            Err(RingError::TooLarge(_))
        ));
    }

    #[test]
    fn need_event_matches_virtio() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 5, 0));
        assert!(need_event(5, 6, 0));
        assert!(!need_event(5, 9, 6));
        assert!(need_event(u32::MAX, 3, u32::MAX - 2));
    }

    proptest::proptest! {
        /// Whatever a hostile peer writes into the shared header, both sides only ever
        /// return records inside the mapping, or errors.
        #[test]
        fn hostile_control_words_never_escape(
            words in proptest::collection::vec((0usize..0x200, proptest::prelude::any::<u32>()), 1..20),
            data in proptest::collection::vec((0usize..64, proptest::prelude::any::<u32>()), 0..20),
        ) {
            let mut b = Buf::new(MIN_DATA_SIZE);
            let (mut p, mut c) = pair(&mut b, Side::Rx);
            let mem = b.mem();
            let info = attach(mem).unwrap();
            let (_, base) = info.offsets(Side::Rx);
            for (off, v) in words {
                let _ = mem.write_u32(off & !3, v);
            }
            for (i, v) in data {
                let _ = mem.write_u32(base + i * 4, v);
            }
            for _ in 0..8 {
                match c.peek() {
                    Ok(Some(r)) => {
                        let start = r.ptr() as usize - mem.ptr(0, 0).unwrap() as usize;
                        proptest::prop_assert!(start + r.len() <= mem.len());
                        c.pop(r).unwrap();
                    }
                    _ => break,
                }
            }
            if let Ok(Some(r)) = p.reserve(1500) {
                let start = r.ptr() as usize - mem.ptr(0, 0).unwrap() as usize;
                proptest::prop_assert!(start + r.len() <= mem.len());
            }
        }
    }
}
