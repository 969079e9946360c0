//! Access to the shared mapping: bounds-checked volatile and atomic accesses at offsets,
//! never a Rust reference to bytes the peer may write.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::RingError;

/// A view of shared memory: a base pointer and a length. Every access checks its bounds
/// and alignment and fails instead of reaching outside.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: `Mem` is a pointer and a length to shared memory that only volatile and atomic
// accesses reach; it is as good on one thread as on another.
unsafe impl Send for Mem {}
// SAFETY: as above; no access through `&Mem` forms a reference to the memory.
unsafe impl Sync for Mem {}

impl Mem {
    /// A view of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, 8-byte aligned, for as long
    /// as this value (and every copy of it) is used.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self { base, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty view.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address `off` bytes in, if `off + n` is inside.
    pub fn ptr(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `off <= len`, inside (or one past) the mapping.
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    fn aligned(&self, off: usize, n: usize) -> Option<*mut u8> {
        let p = self.ptr(off, n)?;
        (off % n == 0).then_some(p)
    }

    /// The atomic u32 at `off` (4-byte aligned, inside).
    pub fn atomic_u32(&self, off: usize) -> Result<&AtomicU32, RingError> {
        let p = self
            .aligned(off, 4)
            .ok_or_else(|| RingError::Map(format!("u32 at {off:#x} outside the mapping")))?;
        // SAFETY: inside the mapping and aligned (checked); the memory lives as long as
        // `self` (contract of `new`); atomics may be accessed concurrently by the peer.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// The atomic u64 at `off` (8-byte aligned, inside).
    pub fn atomic_u64(&self, off: usize) -> Result<&AtomicU64, RingError> {
        let p = self
            .aligned(off, 8)
            .ok_or_else(|| RingError::Map(format!("u64 at {off:#x} outside the mapping")))?;
        // SAFETY: as in `atomic_u32`.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// Reads `dst.len()` bytes at `off` (one snapshot: the peer may change them meanwhile,
    /// so validate the copy, not the memory).
    pub fn read(&self, off: usize, dst: &mut [u8]) -> Result<(), RingError> {
        let p = self
            .ptr(off, dst.len())
            .ok_or_else(|| RingError::Map(format!("read at {off:#x} outside the mapping")))?;
        // SAFETY: `dst.len()` bytes at `p` are inside the mapping (checked); `dst` is ours
        // and cannot overlap shared memory we only reach through raw pointers.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Writes `src` at `off`.
    pub fn write(&self, off: usize, src: &[u8]) -> Result<(), RingError> {
        let p = self
            .ptr(off, src.len())
            .ok_or_else(|| RingError::Map(format!("write at {off:#x} outside the mapping")))?;
        // SAFETY: as in `read`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Reads the u32 at `off` once (little-endian, volatile).
    pub fn read_u32(&self, off: usize) -> Result<u32, RingError> {
        let p = self
            .aligned(off, 4)
            .ok_or_else(|| RingError::Map(format!("u32 at {off:#x} outside the mapping")))?;
        // SAFETY: inside and aligned (checked).
        Ok(u32::from_le(unsafe {
            std::ptr::read_volatile(p.cast::<u32>())
        }))
    }

    /// Writes the u32 at `off` (little-endian, volatile).
    pub fn write_u32(&self, off: usize, v: u32) -> Result<(), RingError> {
        let p = self
            .aligned(off, 4)
            .ok_or_else(|| RingError::Map(format!("u32 at {off:#x} outside the mapping")))?;
        // SAFETY: inside and aligned (checked).
        unsafe { std::ptr::write_volatile(p.cast::<u32>(), v.to_le()) };
        Ok(())
    }
}

/// A shared, read-write mmap of a file descriptor (the ring memfd), unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    mem: Mem,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and writable.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> Result<Self, RingError> {
        if len == 0 {
            return Err(RingError::Map("an empty mapping".into()));
        }
        // SAFETY: a new shared mapping chosen by the kernel; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RingError::Map(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        let base = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| RingError::Map("mmap returned NULL".into()))?;
        // SAFETY: the kernel mapped `len` bytes at `base` (page-aligned) for as long as this
        // `Mapping` lives; `Mem` copies must not outlive it (documented on `mem`).
        let mem = unsafe { Mem::new(base, len) };
        Ok(Self { mem })
    }

    /// The view of the mapping. Copies of it must not be used after the `Mapping` drops.
    pub fn mem(&self) -> Mem {
        self.mem
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.mem.base.as_ptr().cast(), self.mem.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_outside_or_misaligned_fail() {
        let mut buf = vec![0u64; 8];
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: 64 bytes of `buf`, 8-aligned, alive for the test.
        let m = unsafe { Mem::new(base, 64) };
        assert!(m.atomic_u32(60).is_ok());
        assert!(m.atomic_u32(62).is_err());
        assert!(m.atomic_u32(64).is_err());
        assert!(m.atomic_u64(56).is_ok());
        assert!(m.atomic_u64(60).is_err());
        assert!(m.read(usize::MAX, &mut [0u8; 2]).is_err());
        assert!(m.write(63, b"ab").is_err());
        m.write(62, b"ab").unwrap();
        let mut b = [0u8; 2];
        m.read(62, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        m.write_u32(8, 0x1234_5678).unwrap();
        assert_eq!(m.read_u32(8).unwrap(), 0x1234_5678);
        assert!(m.read_u32(9).is_err());
        assert!(m.ptr(64, 0).is_some());
        assert!(m.ptr(64, 1).is_none());
    }
}
