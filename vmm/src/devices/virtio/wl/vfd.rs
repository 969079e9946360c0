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
}

impl Vfd {
    /// A vfd of `kind`.
    pub fn new(kind: VfdKind) -> Self {
        Self {
            kind,
            hung_up: false,
            hub: None,
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
}

impl ShmWindow {
    /// A window at guest address `base` (0 until the transport places it), mapping through
    /// `slots` (None: allocation works but nothing is mapped; for parser-level tests).
    pub fn new(slots: Option<Arc<MemorySlots>>, base: u64) -> Result<Self, vm_allocator::Error> {
        Ok(Self {
            slots,
            base,
            alloc: AddressAllocator::new(0, SHM_WINDOW_SIZE)?,
        })
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
    pub fn map(&mut self, fd: OwnedFd, size: u64, writable: bool) -> Result<Shm, ResponseCode> {
        let size = page_align(size)
            .filter(|s| *s > 0 && *s <= SHM_WINDOW_SIZE)
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

/// Classifies an fd received from a host socket: shared memory (seekable, mapped), a socket,
/// or a pipe-like fd with its direction from the access mode.
pub fn classify_host_fd(fd: OwnedFd, window: &mut ShmWindow) -> Result<VfdKind, ResponseCode> {
    let raw = fd.as_raw_fd();
    // SAFETY: fstat on an fd we own, into a zeroed stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(raw, &mut st) } != 0 {
        return Err(ResponseCode::Err);
    }
    // SAFETY: F_GETFL on an fd we own.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    let acc = fl & libc::O_ACCMODE;
    if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
        return Ok(VfdKind::Socket(UnixStream::from(fd)));
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        // SAFETY: lseek on an fd we own.
        let end = unsafe { libc::lseek(raw, 0, libc::SEEK_END) };
        if end > 0 {
            // SAFETY: F_GET_SEALS on an fd we own (fails harmlessly on non-memfds).
            let seals = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
            let sealed = seals > 0 && seals & libc::F_SEAL_WRITE != 0;
            let writable = acc == libc::O_RDWR && !sealed;
            return window.map(fd, end as u64, writable).map(VfdKind::Shm);
        }
    }
    Ok(VfdKind::Pipe {
        local: fd,
        remote: None,
        guest_reads: acc != libc::O_WRONLY,
    })
}
