//! The `/dev/wl0` ioctl interface (ChromiumOS numbers and layouts; see
//! rootfs/guest/virtio_wl/include/uapi/linux/virtwl.h).

/// Most fds in one SEND or RECV.
pub const SEND_MAX_ALLOCS: usize = 28;
/// Longest context name.
pub const CTX_NAME_MAX_LEN: usize = 32;

/// `VIRTWL_IOCTL_NEW` (nr 0, 48-byte argument).
pub const IOCTL_NEW: libc::c_ulong = 0xC030_7700;
/// `VIRTWL_IOCTL_SEND` (nr 1).
pub const IOCTL_SEND: libc::c_ulong = 0x8074_7701;
/// `VIRTWL_IOCTL_RECV` (nr 2).
pub const IOCTL_RECV: libc::c_ulong = 0x4074_7702;

/// `virtwl_ioctl_new.type` values.
pub mod new_type {
    /// Connect to the unnamed socket.
    pub const CTX: u32 = 0;
    /// Shared memory.
    pub const ALLOC: u32 = 1;
    /// A pipe the guest reads.
    pub const PIPE_READ: u32 = 2;
    /// A pipe the guest writes.
    pub const PIPE_WRITE: u32 = 3;
    /// Connect to a named socket.
    pub const CTX_NAMED: u32 = 5;
}

/// `struct virtwl_ioctl_new` (48 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IoctlNew {
    /// `new_type::*`.
    pub kind: u32,
    /// Out: the new fd.
    pub fd: i32,
    /// 0.
    pub flags: u32,
    /// `size` (ALLOC) in the first 4 bytes, or `name` (CTX_NAMED).
    pub payload: [u8; 36],
}

/// `struct virtwl_ioctl_txn` header (116 bytes), followed by the data.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IoctlTxn {
    /// fds; SEND stops at the first negative one, RECV fills -1 for unused.
    pub fds: [i32; SEND_MAX_ALLOCS],
    /// SEND: data bytes; RECV: in capacity, out bytes received.
    pub len: u32,
}

const _: () = assert!(std::mem::size_of::<IoctlNew>() == 48);
const _: () = assert!(std::mem::size_of::<IoctlTxn>() == 116);
// The encoded size fields must agree with the structs.
const _: () = assert!((IOCTL_NEW >> 16) & 0x3fff == 48);
const _: () = assert!((IOCTL_SEND >> 16) & 0x3fff == 116);
const _: () = assert!((IOCTL_RECV >> 16) & 0x3fff == 116);
