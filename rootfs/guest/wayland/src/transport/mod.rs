//! The virtio_wl side of the proxies, behind a trait so that the proxy logic runs the same
//! over the real device (`virtio`, `/dev/wl0` through `bulkhead-wl`) and over the test
//! stand-in (`standin`: socketpairs and memfds, used on the build machine, where no guest
//! kernel has the driver).
//!
//! The model is virtio_wl's: a connection carries bytes and *vfds* (at most 28 per message);
//! only vfds cross, so everything else is translated first: memory into a shared-memory vfd
//! ([`Transport::alloc`]), a pipe into a pipe vfd ([`Transport::pipe_from_peer`]).

pub mod standin;
pub mod virtio;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// At most this many fds go with one message over virtio_wl (`VIRTWL_SEND_MAX_ALLOCS`), and
/// libwayland reads at most this many with one batch (`MAX_FDS_OUT`).
pub const MAX_FDS: usize = 28;

/// One connection (a context vfd).
pub trait Channel: Send {
    /// Sends `data` with `fds` (vfds only, at most [`MAX_FDS`]). Blocks until sent.
    fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()>;
    /// Receives one message. Call it when [`Channel::poll_fd`] is readable. Empty data and
    /// no fds means the peer hung up.
    fn recv(&self) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)>;
    /// The fd to poll for readability.
    fn poll_fd(&self) -> BorrowedFd<'_>;
}

/// A pipe whose write end goes to the peer; the proxy reads what the peer writes.
pub struct PipeFromPeer {
    /// Where the data arrives.
    pub local: Box<dyn Read + Send>,
    /// The vfd to send (the write end). Drop it once sent, so that EOF can propagate.
    pub remote: OwnedFd,
}

/// The connections a provider accepts (the faux accept).
pub trait Acceptor {
    /// Waits for the next connection; returns it and its name (`wl-conn-N`).
    fn accept(&mut self) -> std::io::Result<(Box<dyn Channel>, String)>;
}

/// The device: connections, shared memory and pipes.
pub trait Transport: Send + Sync {
    /// Connects to a service (`wayland@gui-vm`). An error means refused or not there.
    fn connect(&self, name: &str) -> std::io::Result<Box<dyn Channel>>;
    /// New shared memory of at least `size` bytes, mapped read-write, and its vfd.
    fn alloc(&self, size: usize) -> std::io::Result<(OwnedFd, Mapping)>;
    /// A new pipe whose write end is sent to the peer.
    fn pipe_from_peer(&self) -> std::io::Result<PipeFromPeer>;
    /// A writer for a pipe write end received from the peer.
    fn received_pipe_writer(&self, fd: OwnedFd) -> Box<dyn Write + Send>;
    /// Maps `len` bytes of a shared-memory vfd received from the peer, read-only.
    fn map_received(&self, fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping>;
    /// Whether `fd` is a vfd (it can be sent as it is).
    fn is_vfd(&self, fd: BorrowedFd<'_>) -> bool;
}

/// A shared mapping of a memory fd. The proxy never makes a Rust slice of it (the peer may
/// write at any time); bytes go in and out through system calls (`pread`, `write`), which
/// also turn a shrunk file into an error instead of a SIGBUS.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    writable: bool,
    /// Every byte is known to be backed (memory this proxy sized, or a vfd the driver
    /// bounds): only then may the proxy load or store through the pointer itself. Other
    /// mappings are reached through system calls only, which fail instead of faulting.
    backed: bool,
}

// SAFETY: a shared mapping owned by this value; it is only accessed through system calls
// and raw pointers, from whichever thread owns it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (shared), writable or not. The file may be shorter than
    /// `len` (a peer's memory): then only system calls touch it.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> std::io::Result<Self> {
        Self::map(fd, len, writable, false)
    }

    /// Maps `len` bytes of `fd`, which the caller knows are all backed: memory it sized
    /// itself, or a vfd (the driver refuses a mapping past the vfd's size).
    pub fn new_backed(fd: BorrowedFd<'_>, len: usize, writable: bool) -> std::io::Result<Self> {
        Self::map(fd, len, writable, true)
    }

    fn map(fd: BorrowedFd<'_>, len: usize, writable: bool, backed: bool) -> std::io::Result<Self> {
        if len == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a new shared mapping at an address the kernel chooses; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            writable,
            backed,
        })
    }

    /// The mapping's size.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: `new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `[at, at + len)` of the mapping from `src` at offset `src_at` with `pread`.
    /// Returns the bytes copied (fewer if `src` is shorter). Out of range: an error.
    pub fn fill_from(
        &self,
        at: usize,
        len: usize,
        src: BorrowedFd<'_>,
        src_at: u64,
    ) -> std::io::Result<usize> {
        match at.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(std::io::Error::from_raw_os_error(libc::ERANGE)),
        }
        if !self.writable {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        let mut done = 0usize;
        while done < len {
            let off = i64::try_from(src_at + done as u64)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::ERANGE))?;
            // SAFETY: `at + done .. at + len` is inside the mapping (checked above); the
            // kernel writes at most `len - done` bytes there.
            let n = unsafe {
                libc::pread(
                    src.as_raw_fd(),
                    self.ptr.add(at + done).cast(),
                    len - done,
                    off,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EFAULT) && self.backed {
                    // The kernel would not copy straight into this mapping (device memory
                    // it does not fault in): go through a buffer.
                    return self
                        .fill_bounced(at + done, len - done, src, src_at + done as u64)
                        .map(|n| done + n);
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(done)
    }

    fn fill_bounced(
        &self,
        at: usize,
        len: usize,
        src: BorrowedFd<'_>,
        src_at: u64,
    ) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::from(src.try_clone_to_owned()?);
        let mut buf = vec![0u8; len.min(1 << 20)];
        let mut done = 0usize;
        while done < len {
            let want = (len - done).min(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            let n = f.read_at(chunk, src_at + done as u64)?;
            if n == 0 {
                break;
            }
            // SAFETY: `at + done + n <= at + len`, inside the mapping (checked by the
            // caller); `buf` holds at least `n` bytes; the two never overlap.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(at + done), n) };
            done += n;
        }
        Ok(done)
    }

    /// Writes `[0, len)` of the mapping to `dst` with `write`.
    pub fn write_to(&self, len: usize, dst: BorrowedFd<'_>) -> std::io::Result<()> {
        if len > self.len {
            return Err(std::io::Error::from_raw_os_error(libc::ERANGE));
        }
        let mut done = 0usize;
        while done < len {
            // SAFETY: reads `len - done` bytes from inside the mapping (len <= self.len).
            let n = unsafe { libc::write(dst.as_raw_fd(), self.ptr.add(done).cast(), len - done) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EFAULT) && self.backed {
                    // As in `fill_from`: copy out through a buffer.
                    let mut buf = vec![0u8; len - done];
                    self.read_at(done, &mut buf)?;
                    let mut f = std::fs::File::from(dst.try_clone_to_owned()?);
                    return std::io::Write::write_all(&mut f, &buf);
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Reads `dst.len()` bytes at `at` (volatile loads: a snapshot; for tests and checks).
    /// Only on a backed mapping ([`Mapping::new_backed`]).
    pub fn read_at(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        match at.checked_add(dst.len()) {
            Some(end) if end <= self.len && self.backed => {}
            _ => return Err(std::io::Error::from_raw_os_error(libc::ERANGE)),
        }
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: at + i < at + dst.len() <= len: inside the mapping.
            *d = unsafe { std::ptr::read_volatile(self.ptr.add(at + i)) };
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd};

    fn memfd(bytes: &[u8]) -> OwnedFd {
        // SAFETY: a static NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nothing else owns.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        std::io::Write::write_all(&mut f, bytes).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn fill_copies_from_a_file_and_stops_at_its_end() {
        let dst = memfd(&[0u8; 8192]);
        let m = Mapping::new_backed(dst.as_fd(), 8192, true).unwrap();
        let src = memfd(b"0123456789");
        assert_eq!(m.fill_from(100, 4, src.as_fd(), 3).unwrap(), 4);
        let mut b = [0u8; 4];
        m.read_at(100, &mut b).unwrap();
        assert_eq!(&b, b"3456");
        // A source shorter than asked (a client that shrank its pool): fewer bytes, no fault.
        assert_eq!(m.fill_from(0, 100, src.as_fd(), 5).unwrap(), 5);
        assert!(
            m.fill_from(8190, 4, src.as_fd(), 0).is_err(),
            "out of range"
        );
        let ro = Mapping::new(dst.as_fd(), 8192, false).unwrap();
        assert!(ro.fill_from(0, 4, src.as_fd(), 0).is_err(), "read-only");
    }

    #[test]
    fn a_mapping_past_the_end_of_a_short_file_fails_instead_of_faulting() {
        // A peer's 10-byte file mapped as 1 MiB: writing it out fails (EFAULT from the
        // kernel) and is never retried through the pointer, which would be a SIGBUS.
        let short = memfd(b"0123456789");
        let m = Mapping::new(short.as_fd(), 1 << 20, false).unwrap();
        let out = memfd(b"");
        assert!(m.write_to(1 << 20, out.as_fd()).is_err());
        let mut b = [0u8; 4];
        assert!(
            m.read_at(0, &mut b).is_err(),
            "no loads on an unbacked mapping"
        );
    }

    #[test]
    fn the_bounce_path_copies_the_same_bytes() {
        let dst = memfd(&[0u8; 4096]);
        let m = Mapping::new_backed(dst.as_fd(), 4096, true).unwrap();
        let src = memfd(b"abcdefgh");
        assert_eq!(m.fill_bounced(10, 8, src.as_fd(), 0).unwrap(), 8);
        let mut b = [0u8; 8];
        m.read_at(10, &mut b).unwrap();
        assert_eq!(&b, b"abcdefgh");
        let out = memfd(b"");
        m.write_to(18, out.as_fd()).unwrap();
        let mut got = Vec::new();
        use std::io::{Read, Seek};
        let mut f = std::fs::File::from(out);
        f.rewind().unwrap();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(&got[10..18], b"abcdefgh");
    }
}
