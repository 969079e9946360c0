//! A net ring in plain memory, both ends in this process (the virtio-net tests' net VM).

use std::ptr::NonNull;

use bulkhead_netring::{attach, create, ring_len, Consumer, Mem, Producer, Side, MIN_DATA_SIZE};

/// A ring in plain memory (both ends in this process).
pub struct TestRing {
    buf: Vec<u64>,
}

impl TestRing {
    pub fn new() -> Self {
        let mut r = TestRing {
            buf: vec![0u64; ring_len(MIN_DATA_SIZE) / 8],
        };
        create(r.mem(), MIN_DATA_SIZE, [2, 0, 0, 0, 0, 1]).unwrap();
        r
    }

    pub fn mem(&mut self) -> Mem {
        let p = NonNull::new(self.buf.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: the buffer lives as long as the TestRing and is 8-aligned.
        unsafe { Mem::new(p, self.buf.len() * 8) }
    }

    /// The producer and consumer of `side`.
    pub fn ends(&mut self, side: Side) -> (Producer, Consumer) {
        let mem = self.mem();
        let info = attach(mem).unwrap();
        (
            Producer::new(mem, &info, side),
            Consumer::new(mem, &info, side),
        )
    }
}
