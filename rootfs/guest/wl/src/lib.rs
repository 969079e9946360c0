//! bulkhead-wl: the guest side of virtio_wl, over the `/dev/wl0` driver
//! (rootfs/guest/virtio_wl).
//!
//! - `Wl::open()` opens the device; `connect(name)` gives a `WlStream` (a context vfd):
//!   `send(data, fds)`, `recv() -> (data, fds)`, `Read`/`Write`, non-blocking mode.
//! - `alloc(size)` gives `SharedMemory`: a mapped shm vfd that can be sent to the host (zero
//!   copy: both sides see the same pages).
//! - `pipe_read()` / `pipe_write()` give pipe vfds whose other end is sent as an fd.
//! - `Listener`: the faux accept. A server VM connects a listener context; the hub sends
//!   connection names (`wl-conn-N\n`) over it; `accept()` reads one and connects to it.
//!
//! Fds are owned (`OwnedFd`): what is sent cannot be closed under the sender, and received
//! fds are owned at once. See docs/virtio_wl.md.
//!
//! It uses the device the way ChromiumOS programs do, so a program works over ChromiumOS's
//! `virtio_wl` driver too: every write goes through `VIRTWL_IOCTL_SEND` (that driver gives
//! a vfd file the access mode of the device's answer flags, so `write(2)` on a pipe may be
//! refused with EBADF where the ioctl works), reads use `read(2)` or `VIRTWL_IOCTL_RECV`.

pub mod uapi;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use uapi::{new_type, IoctlNew, IoctlTxn, CTX_NAME_MAX_LEN, SEND_MAX_ALLOCS};

/// Most data one RECV returns (one in-queue buffer's payload).
pub const MAX_RECV: usize = 4096;

/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum WlError {
    /// A system call failed.
    #[error("{what}: {err}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Why.
        err: std::io::Error,
    },
    /// A name longer than 32 bytes or containing NUL.
    #[error("bad context name {0:?}")]
    BadName(String),
    /// More than 28 fds in one send.
    #[error("at most {SEND_MAX_ALLOCS} fds per message")]
    TooManyFds,
    /// The listener context closed.
    #[error("the listener context was closed")]
    ListenerClosed,
    /// An access outside a shared-memory mapping.
    #[error("{len} bytes at offset {offset} are outside the {size}-byte mapping")]
    OutOfRange {
        /// Where the access started.
        offset: usize,
        /// How many bytes it covered.
        len: usize,
        /// The mapping's size.
        size: usize,
    },
}

fn last(what: &'static str) -> WlError {
    WlError::Io {
        what,
        err: std::io::Error::last_os_error(),
    }
}

/// The virtio_wl device (`/dev/wl0`).
pub struct Wl {
    dev: OwnedFd,
}

impl Wl {
    /// Opens `/dev/wl0`.
    pub fn open() -> Result<Self, WlError> {
        Self::open_path(Path::new("/dev/wl0"))
    }

    /// Opens the device node at `path`.
    pub fn open_path(path: &Path) -> Result<Self, WlError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|err| WlError::Io {
                what: "open the virtio_wl device",
                err,
            })?;
        Ok(Self { dev: f.into() })
    }

    fn new_vfd(&self, kind: u32, payload: [u8; 36]) -> Result<OwnedFd, WlError> {
        let mut arg = IoctlNew {
            kind,
            fd: -1,
            flags: 0,
            payload,
        };
        // SAFETY: IOCTL_NEW reads and writes one 48-byte IoctlNew, which `arg` is.
        let r = unsafe { libc::ioctl(self.dev.as_raw_fd(), uapi::IOCTL_NEW, &mut arg) };
        if r != 0 || arg.fd < 0 {
            return Err(last("VIRTWL_IOCTL_NEW"));
        }
        // SAFETY: the driver installed a new fd for us.
        Ok(unsafe { OwnedFd::from_raw_fd(arg.fd) })
    }

    /// Connects to the named socket (`""`: the VMM's unnamed socket).
    pub fn connect(&self, name: &str) -> Result<WlStream, WlError> {
        if name.is_empty() {
            return Ok(WlStream {
                fd: self.new_vfd(new_type::CTX, [0; 36])?,
            });
        }
        Ok(WlStream {
            fd: self.new_vfd(new_type::CTX_NAMED, name_payload(name)?)?,
        })
    }

    /// Allocates `size` bytes of shared memory (rounded up to pages) and maps it.
    pub fn alloc(&self, size: usize) -> Result<SharedMemory, WlError> {
        let size32 = u32::try_from(size).map_err(|_| WlError::Io {
            what: "alloc",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut p = [0u8; 36];
        p[..4].copy_from_slice(&size32.to_ne_bytes());
        let fd = self.new_vfd(new_type::ALLOC, p)?;
        SharedMemory::map(fd, size)
    }

    /// A pipe this guest reads; send `WlPipe::fd()` to give the host its write end.
    pub fn pipe_read(&self) -> Result<WlPipe, WlError> {
        Ok(WlPipe {
            fd: self.new_vfd(new_type::PIPE_READ, [0; 36])?,
        })
    }

    /// A pipe this guest writes; send `WlPipe::fd()` to give the host its read end.
    pub fn pipe_write(&self) -> Result<WlPipe, WlError> {
        Ok(WlPipe {
            fd: self.new_vfd(new_type::PIPE_WRITE, [0; 36])?,
        })
    }
}

fn name_payload(name: &str) -> Result<[u8; 36], WlError> {
    if name.len() > CTX_NAME_MAX_LEN || name.contains('\0') {
        return Err(WlError::BadName(name.to_string()));
    }
    let mut p = [0u8; 36];
    p[..name.len()].copy_from_slice(name.as_bytes());
    Ok(p)
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> Result<(), WlError> {
    // SAFETY: F_GETFL/F_SETFL on an fd we borrow.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(last("fcntl(F_GETFL)"));
    }
    let fl = if on {
        fl | libc::O_NONBLOCK
    } else {
        fl & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl) } < 0 {
        return Err(last("fcntl(F_SETFL)"));
    }
    Ok(())
}

/// A connected context vfd: a message stream that carries fds.
pub struct WlStream {
    fd: OwnedFd,
}

#[repr(C)]
struct TxnBuf {
    hdr: IoctlTxn,
    data: [u8; MAX_RECV],
}

impl WlStream {
    /// Sends `data` with `fds` (vfds: streams, shared memory, pipes; at most 28).
    pub fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WlError> {
        if fds.len() > SEND_MAX_ALLOCS {
            return Err(WlError::TooManyFds);
        }
        send_txn(self.fd.as_raw_fd(), data, fds).map_err(|err| WlError::Io {
            what: "VIRTWL_IOCTL_SEND",
            err,
        })
    }

    /// Receives one message: its data (at most 4096 bytes) and fds. Empty data and no fds
    /// means the host end hung up. Blocks unless non-blocking (then `WouldBlock`).
    pub fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), WlError> {
        let mut buf = Box::new(TxnBuf {
            hdr: IoctlTxn {
                fds: [-1; SEND_MAX_ALLOCS],
                len: MAX_RECV as u32,
            },
            data: [0; MAX_RECV],
        });
        // SAFETY: IOCTL_RECV reads the header and writes the header and up to `len` data
        // bytes, all inside `buf`.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                uapi::IOCTL_RECV,
                &mut *buf as *mut TxnBuf,
            )
        };
        if r != 0 {
            return Err(last("VIRTWL_IOCTL_RECV"));
        }
        let fds = buf
            .hdr
            .fds
            .iter()
            .filter(|fd| **fd >= 0)
            // SAFETY: the driver installed these fds for us; each is owned exactly once.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        let n = (buf.hdr.len as usize).min(MAX_RECV);
        Ok((buf.data.get(..n).unwrap_or_default().to_vec(), fds))
    }

    /// Non-blocking mode (recv/read give `WouldBlock`, send `EAGAIN` when the queue is full
    /// or the peer is not reading).
    pub fn set_nonblocking(&self, on: bool) -> Result<(), WlError> {
        set_nonblocking(self.fd.as_fd(), on)
    }

    /// The vfd, e.g. to send this stream over another one.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for WlStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<OwnedFd> for WlStream {
    /// A stream over a received vfd (the caller knows it is a context or socket).
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

/// One `VIRTWL_IOCTL_SEND` of `data` with `fds` (at most 28) on vfd `fd`, through the
/// device's back-pressure ([`through_back_pressure`]).
fn send_txn(fd: RawFd, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let len =
        u32::try_from(data.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EMSGSIZE))?;
    let mut hdr = IoctlTxn {
        fds: [-1; SEND_MAX_ALLOCS],
        len,
    };
    for (slot, f) in hdr.fds.iter_mut().zip(fds) {
        *slot = f.as_raw_fd();
    }
    let hsize = std::mem::size_of::<IoctlTxn>();
    let mut buf = vec![0u8; hsize + data.len()];
    // SAFETY: `buf` has room for the header; IoctlTxn is plain old data.
    unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast::<IoctlTxn>(), hdr) };
    if let Some(d) = buf.get_mut(hsize..) {
        d.copy_from_slice(data);
    }
    through_back_pressure(fd, || {
        // SAFETY: IOCTL_SEND reads the header and `len` data bytes, all inside `buf`.
        unsafe { libc::ioctl(fd, uapi::IOCTL_SEND, buf.as_mut_ptr()) as isize }
    })?;
    Ok(())
}

/// Most data bytes one `write` on a vfd sends (one SEND; `write_all` sends the rest): small
/// enough for any driver's kernel buffer, as ChromiumOS programs send.
pub const MAX_WRITE: usize = 32 << 10;

/// `write` on a vfd: one SEND of at most [`MAX_WRITE`] bytes and no fds, never `write(2)`.
fn write_vfd(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    let n = buf.len().min(MAX_WRITE);
    send_txn(fd, buf.get(..n).unwrap_or_default(), &[])?;
    Ok(n)
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: reads into `buf`, which has `buf.len()` writable bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// How many times a blocking SEND is tried again under back-pressure before the error is
/// returned: the device waits about half a second each time, so about a minute in all.
const BACK_PRESSURE_RETRIES: u32 = 120;

/// Runs a SEND until it goes through. ENOMEM from a SEND is
/// the device's back-pressure: the peer took nothing for a while (the device waited first)
/// and nothing was sent. A blocking vfd tries again, as send(2) would go on waiting, but
/// not forever (an ENOMEM that is not back-pressure must come out); a non-blocking one gets
/// `EAGAIN` at once.
fn through_back_pressure(fd: RawFd, mut send: impl FnMut() -> isize) -> std::io::Result<isize> {
    let mut tries = 0;
    loop {
        let r = send();
        if r >= 0 {
            return Ok(r);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOMEM) {
            return Err(e);
        }
        // SAFETY: F_GETFL on an fd the caller holds open.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl >= 0 && fl & libc::O_NONBLOCK != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        tries += 1;
        if tries > BACK_PRESSURE_RETRIES {
            return Err(e);
        }
    }
}

impl Read for &WlStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }
}

impl Write for &WlStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_vfd(self.fd.as_raw_fd(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A pipe vfd: read or write it here, send `fd()` to give the other end away.
pub struct WlPipe {
    fd: OwnedFd,
}

impl WlPipe {
    /// The vfd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> Result<(), WlError> {
        set_nonblocking(self.fd.as_fd(), on)
    }
}

impl From<OwnedFd> for WlPipe {
    /// A pipe over a received pipe vfd (the caller knows it is one).
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl Read for &WlPipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        read_fd(self.fd.as_raw_fd(), buf)
    }
}

impl Write for &WlPipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_vfd(self.fd.as_raw_fd(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Shared memory mapped into this process (an shm vfd: allocated here or received).
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value.
unsafe impl Send for SharedMemory {}

impl SharedMemory {
    /// Maps `len` bytes of the shm vfd `fd` read-write.
    pub fn map(fd: OwnedFd, len: usize) -> Result<Self, WlError> {
        // SAFETY: a fresh shared mapping chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last("mmap of a shm vfd"));
        }
        Ok(Self {
            fd,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mapping's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, for memory only this VM writes while the slice lives (a buffer it
    /// allocated and has not shared yet, or one the peer has finished with).
    ///
    /// **Not for memory another VM (or the host) writes concurrently**: a `&[u8]` promises
    /// the bytes do not change while it lives, so the compiler may read a byte twice or
    /// not at all and get different answers than the memory holds. Use
    /// [`SharedMemory::read_volatile_at`] / [`SharedMemory::copy_to`] for such memory, and
    /// validate the copy, not the shared bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, writable; the same caveat as [`SharedMemory::as_slice`]: not for memory
    /// another VM reads or writes concurrently (use [`SharedMemory::write_volatile_at`] /
    /// [`SharedMemory::copy_from`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only slice from this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), WlError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(WlError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Reads the byte at `offset` with a volatile load: each call reads the memory once, as
    /// it is now, even while another VM writes it.
    pub fn read_volatile_at(&self, offset: usize) -> Result<u8, WlError> {
        self.check(offset, 1)?;
        // SAFETY: `offset` < `len` (checked), so the byte is inside the live mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.add(offset)) })
    }

    /// Writes the byte at `offset` with a volatile store (it reaches the memory, where
    /// another VM may read it). On a buffer the host shared read-only the store is
    /// dropped (see docs/virtio_wl.md).
    pub fn write_volatile_at(&mut self, offset: usize, value: u8) -> Result<(), WlError> {
        self.check(offset, 1)?;
        // SAFETY: `offset` < `len` (checked), inside the live mapping; `&mut self` means no
        // slice from `as_slice` is alive in this process.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset), value) };
        Ok(())
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst` with volatile loads (a
    /// snapshot that may mix old and new bytes if another VM writes meanwhile: validate the
    /// copy).
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), WlError> {
        self.check(offset, dst.len())?;
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: offset + i < offset + dst.len() <= len (checked): inside the mapping.
            *d = unsafe { std::ptr::read_volatile(self.ptr.add(offset + i)) };
        }
        Ok(())
    }

    /// Copies `src` into the memory starting at `offset` with volatile stores.
    pub fn copy_from(&mut self, offset: usize, src: &[u8]) -> Result<(), WlError> {
        self.check(offset, src.len())?;
        for (i, b) in src.iter().enumerate() {
            // SAFETY: offset + i < offset + src.len() <= len (checked): inside the mapping;
            // `&mut self` means no slice from `as_slice` is alive in this process.
            unsafe { std::ptr::write_volatile(self.ptr.add(offset + i), *b) };
        }
        Ok(())
    }

    /// The vfd, to send it.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Splits connection names out of the bytes a listener context delivers (`name\n` each);
/// keeps a partial name for the next call. Names over 32 bytes are skipped.
#[derive(Default)]
pub struct NameFramer {
    partial: Vec<u8>,
}

impl NameFramer {
    /// Feeds bytes; returns the complete names in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' || b == 0 {
                if !self.partial.is_empty() {
                    if let Ok(s) = std::str::from_utf8(&self.partial) {
                        if s.len() <= CTX_NAME_MAX_LEN {
                            out.push(s.to_string());
                        }
                    }
                    self.partial.clear();
                }
            } else if self.partial.len() <= CTX_NAME_MAX_LEN {
                self.partial.push(b);
            }
        }
        out
    }
}

/// The faux accept: connection names arrive on a listener context; `accept` connects.
pub struct Listener<'a> {
    wl: &'a Wl,
    ctx: WlStream,
    framer: NameFramer,
    ready: std::collections::VecDeque<String>,
}

impl<'a> Listener<'a> {
    /// Listens on the context named `listener_name` (what the VM's policy set up for it).
    pub fn bind(wl: &'a Wl, listener_name: &str) -> Result<Self, WlError> {
        Ok(Self {
            wl,
            ctx: wl.connect(listener_name)?,
            framer: NameFramer::default(),
            ready: Default::default(),
        })
    }

    /// Waits for the next connection name and connects to it.
    pub fn accept(&mut self) -> Result<(WlStream, String), WlError> {
        loop {
            if let Some(name) = self.ready.pop_front() {
                return Ok((self.wl.connect(&name)?, name));
            }
            let (data, _fds) = self.ctx.recv()?;
            if data.is_empty() {
                return Err(WlError::ListenerClosed);
            }
            self.ready.extend(self.framer.feed(&data));
        }
    }

    /// The listener context (to poll it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ctx.fd()
    }

    /// Non-blocking mode: `accept` gives `WouldBlock` (an `Io` error) when no connection
    /// name is waiting, so a program can poll [`Listener::fd`] alongside other fds. Names
    /// already read are still returned first.
    pub fn set_nonblocking(&self, on: bool) -> Result<(), WlError> {
        self.ctx.set_nonblocking(on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_framed_across_messages() {
        let mut f = NameFramer::default();
        assert_eq!(f.feed(b"wl-conn-0\nwl-co"), vec!["wl-conn-0"]);
        assert_eq!(f.feed(b"nn-1\n\n"), vec!["wl-conn-1"]);
        let long = format!("{}\nok\n", "x".repeat(40));
        assert_eq!(f.feed(long.as_bytes()), vec!["ok"]);
        assert_eq!(f.feed(b"a\0b\n"), vec!["a", "b"]);
    }

    #[test]
    fn bad_names_are_refused_before_any_ioctl() {
        assert!(matches!(
            name_payload(&"n".repeat(33)),
            Err(WlError::BadName(_))
        ));
        assert!(matches!(name_payload("a\0b"), Err(WlError::BadName(_))));
        let p = name_payload("wayland").unwrap();
        assert_eq!(&p[..8], b"wayland\0");
    }

    fn memfd(len: usize) -> OwnedFd {
        // SAFETY: a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"wl-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone().unwrap())
            .set_len(len as u64)
            .unwrap();
        fd
    }

    #[test]
    fn volatile_accessors_see_the_other_mapping_and_check_bounds() {
        let fd = memfd(4096);
        // Two mappings of one memfd stand for two VMs sharing a buffer.
        let mut ours = SharedMemory::map(fd.try_clone().unwrap(), 4096).unwrap();
        let mut theirs = SharedMemory::map(fd, 4096).unwrap();
        assert_eq!(ours.len(), 4096);
        ours.write_volatile_at(10, 0x5a).unwrap();
        assert_eq!(theirs.read_volatile_at(10).unwrap(), 0x5a);
        theirs.copy_from(4090, b"at end").unwrap();
        let mut b = [0u8; 6];
        ours.copy_to(4090, &mut b).unwrap();
        assert_eq!(&b, b"at end");
        theirs.write_volatile_at(10, 0xa5).unwrap();
        assert_eq!(
            ours.read_volatile_at(10).unwrap(),
            0xa5,
            "read again, not cached"
        );
        assert!(matches!(
            ours.read_volatile_at(4096),
            Err(WlError::OutOfRange {
                offset: 4096,
                len: 1,
                size: 4096
            })
        ));
        assert!(ours.write_volatile_at(usize::MAX, 0).is_err());
        assert!(ours.copy_to(4091, &mut b).is_err());
        assert!(ours.copy_from(usize::MAX, b"x").is_err());
        assert!(
            ours.copy_to(4096, &mut []).is_ok(),
            "an empty copy at the end"
        );
    }

    #[test]
    fn listener_set_nonblocking_sets_o_nonblock_on_its_context() {
        let wl = Wl {
            dev: std::fs::File::open("/dev/null").unwrap().into(),
        };
        let (r, _w) = std::io::pipe().unwrap();
        let l = Listener {
            wl: &wl,
            ctx: WlStream::from(OwnedFd::from(r)),
            framer: NameFramer::default(),
            ready: Default::default(),
        };
        let flags = |l: &Listener<'_>| {
            // SAFETY: F_GETFL on an open fd.
            unsafe { libc::fcntl(l.fd().as_raw_fd(), libc::F_GETFL) }
        };
        assert_eq!(flags(&l) & libc::O_NONBLOCK, 0);
        l.set_nonblocking(true).unwrap();
        assert_ne!(flags(&l) & libc::O_NONBLOCK, 0);
        l.set_nonblocking(false).unwrap();
        assert_eq!(flags(&l) & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn opening_a_missing_device_is_an_error() {
        assert!(matches!(
            Wl::open_path(Path::new("/nonexistent/wl0")),
            Err(WlError::Io { .. })
        ));
    }
}
