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
    fn map_received(&self, fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        Mapping::new(fd, len, false)
    }
    /// Whether `fd` is a vfd (it can be sent as it is).
    fn is_vfd(&self, fd: BorrowedFd<'_>) -> bool;
}

/// A shared mapping of a memory fd. The proxy never makes a Rust slice of it (the peer may
/// write at any time); bytes go in and out through system calls (`pread`, `write`), which
/// also turn a shrunk file into an error instead of a SIGBUS.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a shared mapping owned by this value; it is only accessed through system calls
// and raw pointers, from whichever thread owns it.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` (shared), writable or not.
    pub fn new(fd: BorrowedFd<'_>, len: usize, writable: bool) -> std::io::Result<Self> {
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
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
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
    pub fn read_at(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        match at.checked_add(dst.len()) {
            Some(end) if end <= self.len => {}
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
