//! Virtual file descriptors: what a vfd id stands for on the host, and the shared-memory
//! window where shm vfds appear in the guest (one KVM memory slot each).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bulkhead_ipc::hub::client::HubConn;
use bulkhead_policy::Rights;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::protocol::{ResponseCode, VfdNew, PFN_SHIFT, VFD_CONTROL, VFD_MAP, VFD_READ, VFD_WRITE};
use crate::vstate::memory_slots::{HostMapping, MemorySlots, SlotHandle};

/// Size of the shared-memory window (virtio shm region 0).
pub const SHM_WINDOW_SIZE: u64 = 1 << 32;
const PAGE: u64 = 4096;

/// Rounds `n` up to a whole page.
pub fn page_align(n: u64) -> Option<u64> {
    n.checked_add(PAGE - 1).map(|v| v & !(PAGE - 1))
}

/// Shared memory mapped into the guest.
pub struct Shm {
    /// The memfd (or received fd) backing it; sent on when the vfd is sent.
    pub fd: OwnedFd,
    /// The range in the window.
    range: RangeInclusive,
    /// Size in bytes (page-aligned).
    pub size: u64,
    /// Guest may write.
    pub writable: bool,
    mapping: Arc<HostMapping>,
    slot: Option<SlotHandle>,
}

impl Shm {
    /// Offset in the window.
    pub fn offset(&self) -> u64 {
        self.range.start()
    }
}

/// What a vfd is on the host.
pub enum VfdKind {
    /// Shared memory.
    Shm(Shm),
    /// A connected stream socket (NEW_CTX, NEW_CTX_NAMED, or a socket received from the host).
    Socket(UnixStream),
    /// A connection through the hub (NEW_CTX_NAMED of a service, or a faux-accepted
    /// `wl-conn-N`): SEQPACKET frames with typed, rights-checked fds, not a byte stream.
    Hub(HubConn),
    /// An fd the guest can hold and pass on but not use: a memfd the hub delivered without
    /// MAP, or a type the device does not map (dmabuf, fence).
    Opaque(OwnedFd),
    /// A pipe. `local` is the end the device uses: it reads it when the guest reads
    /// (`guest_reads`), writes it when the guest writes. `remote` is the other end, sent on
    /// when the vfd is sent over a socket, then dropped so hang-ups propagate.
    Pipe {
        /// The device's end.
        local: OwnedFd,
        /// The end that gets sent, until it is.
        remote: Option<OwnedFd>,
        /// Direction: true if the guest reads.
        guest_reads: bool,
    },
}

/// An object the hub delivered: its identity (for `VmRequest::Release`) and the rights this
/// VM holds on it (what a later send through the hub asks for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubObject {
    /// `(st_dev, st_ino)`.
    pub key: (u64, u64),
    /// The rights from the hub's `FdInfo`.
    pub rights: Rights,
}

/// One vfd.
pub struct Vfd {
    /// Its host object.
    pub kind: VfdKind,
    /// A HUP was queued for it (no more reads).
    pub hung_up: bool,
    /// Set when the hub delivered it.
    pub hub: Option<HubObject>,
    /// Set for a listener context (`listen:<service>`): the hub link's id for it.
    pub listener: Option<super::hub::ListenerId>,
}

impl Vfd {
    /// A vfd of `kind`.
    pub fn new(kind: VfdKind) -> Self {
        Self {
            kind,
            hung_up: false,
            hub: None,
            listener: None,
        }
    }

    /// The rights a send through the hub asks for this vfd's fd: what the hub delivered, or,
    /// for an object that started here, everything its kind can carry (the hub shrinks them
    /// to the connection's contract).
    pub fn rights_to_send(&self) -> Rights {
        if let Some(h) = &self.hub {
            return h.rights;
        }
        let pass = Rights::TRANSFER.union(Rights::DUP);
        let own = match &self.kind {
            VfdKind::Shm(s) => {
                let r = Rights::READ.union(Rights::MAP);
                if s.writable {
                    r.union(Rights::WRITE)
                } else {
                    r
                }
            }
            VfdKind::Socket(_) | VfdKind::Hub(_) => {
                Rights::SEND.union(Rights::RECV).union(Rights::SEND_FDS)
            }
            // `remote` is what travels: the write end when the guest reads.
            VfdKind::Pipe { guest_reads, .. } => {
                if *guest_reads {
                    Rights::WRITE
                } else {
                    Rights::READ
                }
            }
            VfdKind::Opaque(_) => Rights::NONE,
        };
        own.union(pass)
    }

    /// The flags the guest is told.
    pub fn flags(&self, trans_flags: bool) -> u32 {
        match (&self.kind, trans_flags) {
            (VfdKind::Shm(_), true) => 0,
            (VfdKind::Shm(s), false) => VFD_MAP | if s.writable { VFD_WRITE } else { 0 },
            (VfdKind::Socket(_) | VfdKind::Hub(_), true) => VFD_READ | VFD_WRITE,
            (VfdKind::Socket(_) | VfdKind::Hub(_), false) => VFD_CONTROL,
            (VfdKind::Pipe { guest_reads, .. }, true) => {
                if *guest_reads {
                    VFD_READ
                } else {
                    VFD_WRITE
                }
            }
            (VfdKind::Pipe { .. }, false) => 0,
            (VfdKind::Opaque(_), _) => 0,
        }
    }

    /// The fd the device watches for incoming data, if the guest reads this vfd.
    pub fn readable_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.hung_up {
            return None;
        }
        match &self.kind {
            VfdKind::Socket(s) => Some(s.as_fd()),
            VfdKind::Hub(h) => Some(h.as_fd()),
            VfdKind::Pipe {
                local,
                guest_reads: true,
                ..
            } => Some(local.as_fd()),
            _ => None,
        }
    }

    /// The fd that travels when this vfd is sent over a socket.
    pub fn fd_to_send(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            VfdKind::Shm(s) => Some(s.fd.as_fd()),
            VfdKind::Socket(s) => Some(s.as_fd()),
            VfdKind::Pipe { remote, .. } => remote.as_ref().map(|r| r.as_fd()),
            VfdKind::Opaque(fd) => Some(fd.as_fd()),
            // A hub connection stays in this VMM: it is never passed on.
            VfdKind::Hub(_) => None,
        }
    }

    /// The VFD_NEW body describing this vfd.
    pub fn describe(
        &self,
        id: u32,
        trans_flags: bool,
        window: &ShmWindow,
        use_shmem: bool,
    ) -> VfdNew {
        let (pfn, size) = match &self.kind {
            VfdKind::Shm(s) => (window.pfn(s.offset(), use_shmem), s.size as u32),
            _ => (window.no_memory_pfn(use_shmem), 0),
        };
        VfdNew {
            id,
            flags: self.flags(trans_flags),
            pfn,
            size,
        }
    }
}

/// The guest-physical window shm vfds are mapped into, with its page allocator.
pub struct ShmWindow {
    slots: Option<Arc<MemorySlots>>,
    base: u64,
    alloc: AddressAllocator,
    map_attempts: u64,
}

impl ShmWindow {
    /// A window at guest address `base` (0 until the transport places it), mapping through
    /// `slots` (None: allocation works but nothing is mapped; for parser-level tests).
    pub fn new(slots: Option<Arc<MemorySlots>>, base: u64) -> Result<Self, vm_allocator::Error> {
        Ok(Self {
            slots,
            base,
            alloc: AddressAllocator::new(0, SHM_WINDOW_SIZE)?,
            map_attempts: 0,
        })
    }

    /// How many times [`ShmWindow::map`] was called (each success costs an mmap and a KVM
    /// slot): tests check that refused buffers never got that far.
    pub fn map_attempts(&self) -> u64 {
        self.map_attempts
    }

    /// Guest address of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The PFN the guest gets for `offset`.
    pub fn pfn(&self, offset: u64, use_shmem: bool) -> u64 {
        if use_shmem {
            offset >> PFN_SHIFT
        } else {
            (self.base + offset) >> PFN_SHIFT
        }
    }

    /// The PFN for a vfd without memory.
    pub fn no_memory_pfn(&self, use_shmem: bool) -> u64 {
        if use_shmem {
            SHM_WINDOW_SIZE >> PFN_SHIFT
        } else {
            0
        }
    }

    /// Maps `fd` (`size` bytes, page-aligned up) into the window; read-only unless `writable`.
    /// At most 4 GiB less a page: the size the guest is told is a u32.
    pub fn map(&mut self, fd: OwnedFd, size: u64, writable: bool) -> Result<Shm, ResponseCode> {
        self.map_attempts += 1;
        let size = page_align(size)
            .filter(|s| *s > 0 && u32::try_from(*s).is_ok())
            .ok_or(ResponseCode::OutOfMemory)?;
        let len = usize::try_from(size).map_err(|_| ResponseCode::OutOfMemory)?;
        let range = self
            .alloc
            .allocate(size, PAGE, AllocPolicy::FirstMatch)
            .map_err(|_| ResponseCode::OutOfMemory)?;
        let mapping = match HostMapping::map_fd(&fd, len, writable) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                log::warn!("bulkhead-vmm: virtio-wl: {e}");
                let _ = self.alloc.free(&range);
                return Err(ResponseCode::OutOfMemory);
            }
        };
        let slot = match &self.slots {
            Some(slots) if self.base != 0 => {
                match slots.map(self.base + range.start(), mapping.clone()) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        log::warn!("bulkhead-vmm: virtio-wl: {e}");
                        let _ = self.alloc.free(&range);
                        return Err(ResponseCode::OutOfMemory);
                    }
                }
            }
            _ => None,
        };
        Ok(Shm {
            fd,
            range,
            size,
            writable,
            mapping,
            slot,
        })
    }

    /// Unmaps `shm` and frees its range.
    pub fn unmap(&mut self, shm: Shm) {
        let Shm {
            range, slot, fd, ..
        } = shm;
        drop(slot); // the KVM slot goes first
        drop(fd);
        let _ = self.alloc.free(&range);
    }

    /// The window moved (the guest reprogrammed the BAR): remap every live mapping.
    pub fn move_to<'a>(&mut self, base: u64, live: impl Iterator<Item = &'a mut Shm>) {
        self.base = base;
        let Some(slots) = self.slots.clone() else {
            return;
        };
        let mut live: Vec<&mut Shm> = live.collect();
        // Drop every old slot before adding the new ones, so no two slots ever overlap.
        for s in live.iter_mut() {
            s.slot = None;
        }
        for s in live.iter_mut() {
            match slots.map(base + s.offset(), s.mapping.clone()) {
                Ok(h) => s.slot = Some(h),
                Err(e) => log::error!("bulkhead-vmm: virtio-wl: remapping shm: {e}"),
            }
        }
    }
}

/// What an fd received from a host socket is, read from `fstat`, `F_GETFL` and `F_GET_SEALS`
/// only: nothing about the fd (its offset, its mode) is changed, and nothing is mapped yet, so
/// the caller can check its limits first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFd {
    /// A socket: stays a socket vfd (it can carry fds onward).
    Socket,
    /// A regular file (a memfd): shared memory of `size` bytes (its `st_size`, page-aligned),
    /// mapped read-only unless the description is O_RDWR and the file has no write seal.
    Shm {
        /// Page-aligned size.
        size: u64,
        /// The guest's mapping may be written.
        writable: bool,
    },
    /// A FIFO (pipe end): the guest reads it if it is open for reading, otherwise writes it.
    Fifo {
        /// Direction: true if the guest reads.
        guest_reads: bool,
    },
}

/// Why a received fd cannot become a vfd (it is closed and logged; the data that came with
/// it still reaches the guest).
#[derive(Debug, thiserror::Error)]
pub enum HostFdError {
    /// fstat(2) failed.
    #[error("fstat: {0}")]
    Fstat(std::io::Error),
    /// A regular file that cannot be mapped.
    #[error("a regular file that cannot be shared memory ({0})")]
    BadFile(&'static str),
    /// Neither a socket, a regular file nor a FIFO (a character or block device, a
    /// directory, …).
    #[error("unsupported file type: {0}")]
    Unsupported(&'static str),
}

fn file_type_name(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symbolic link",
        _ => "unknown",
    }
}

/// Classifies an fd received from a host socket (see [`HostFd`]).
pub fn inspect_host_fd(fd: BorrowedFd<'_>) -> Result<HostFd, HostFdError> {
    let raw = fd.as_raw_fd();
    // SAFETY: fstat on a borrowed, open fd, into a zeroed stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(raw, &mut st) } != 0 {
        return Err(HostFdError::Fstat(std::io::Error::last_os_error()));
    }
    // SAFETY: F_GETFL on a borrowed, open fd; only reads its flags.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    let acc = fl & libc::O_ACCMODE;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => Ok(HostFd::Socket),
        libc::S_IFIFO => Ok(HostFd::Fifo {
            guest_reads: acc != libc::O_WRONLY,
        }),
        libc::S_IFREG => {
            if acc == libc::O_WRONLY {
                return Err(HostFdError::BadFile("write-only"));
            }
            let size = u64::try_from(st.st_size)
                .ok()
                .filter(|s| *s > 0)
                .ok_or(HostFdError::BadFile("empty"))?;
            let size = page_align(size).ok_or(HostFdError::BadFile("too large"))?;
            // SAFETY: F_GET_SEALS on a borrowed, open fd (fails harmlessly on non-memfds).
            let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
            let sealed = seals > 0 && seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0;
            Ok(HostFd::Shm {
                size,
                writable: acc == libc::O_RDWR && !sealed,
            })
        }
        _ => Err(HostFdError::Unsupported(file_type_name(st.st_mode))),
    }
}

/// The vfd for a received fd that [`inspect_host_fd`] classified as `what`: shared memory is
/// mapped into the window here (one KVM slot), so limits must be checked before.
pub fn host_vfd_kind(
    fd: OwnedFd,
    what: HostFd,
    window: &mut ShmWindow,
) -> Result<VfdKind, ResponseCode> {
    match what {
        HostFd::Socket => Ok(VfdKind::Socket(UnixStream::from(fd))),
        HostFd::Shm { size, writable } => window.map(fd, size, writable).map(VfdKind::Shm),
        HostFd::Fifo { guest_reads } => Ok(VfdKind::Pipe {
            local: fd,
            remote: None,
            guest_reads,
        }),
    }
}
