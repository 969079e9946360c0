//! A TAP device per client: frames with a `virtio_net_hdr_v1` in front (IFF_VNET_HDR), so
//! the records of the rings go to and from the kernel as they are, offloads included.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use bulkhead_netring::MAX_PAYLOAD;

/// virtio-net feature bits that decide what the tap may hand us (`TUNSETOFFLOAD`).
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO4: u64 = 1 << 7;
const GUEST_TSO6: u64 = 1 << 8;

/// The length of the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

/// An open TAP device, removed when dropped (it is not persistent).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn last(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates a TAP from `pattern` (`bhtap%d`), non-blocking, with 12-byte vnet headers.
    pub fn create(pattern: &str) -> std::io::Result<Tap> {
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(last("open /dev/net/tun"));
        }
        // SAFETY: a new fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        let pat = pattern.as_bytes();
        if pat.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other(format!(
                "tap name {pattern:?} too long"
            )));
        }
        req.name[..pat.len()].copy_from_slice(pat);
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (40 bytes).
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(last("TUNSETIFF"));
        }
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(last("TUNSETVNETHDRSZ"));
        }
        let end = req
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(req.name.get(..end).unwrap_or_default()).into_owned();
        let tap = Tap { fd, name };
        tap.set_offloads(0)?;
        Ok(tap)
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the tap hand us what the app VM's guest accepted (its virtio-net `features`):
    /// partial checksums with GUEST_CSUM, TCP segments up to 64 KiB with GUEST_TSO4/6.
    /// Without them the kernel finishes checksums and segments before we read.
    pub fn set_offloads(&self, features: u64) -> std::io::Result<()> {
        let mut flags: libc::c_uint = 0;
        if features & GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if features & GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if features & GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags as its argument value.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(last("TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Writes one frame (header first). The kernel checks the header and the length.
    pub fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (header first) into `dst` (at most `len` bytes, at least a largest
    /// frame's worth). `Ok(None)`: nothing waiting.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes.
    pub unsafe fn read_into(&self, dst: *mut u8, len: usize) -> std::io::Result<Option<usize>> {
        // SAFETY: the caller guarantees `len` writable bytes at `dst`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), dst.cast(), len.min(MAX_PAYLOAD)) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
