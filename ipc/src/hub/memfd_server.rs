//! The memfd server: shared memory for guests, charged to the VM that asked for it until
//! the last holder closes it.
//!
//! Each allocation is a `memfd_create(MFD_ALLOW_SEALING | MFD_NOEXEC_SEAL)` (without the
//! flag on kernels that lack it), made mode 0644 ([`MEMFD_MODE`]: a receiver of another uid
//! cannot reopen it writable through `/proc/self/fd`), truncated to the page-rounded size and
//! sealed with `F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`.
//!
//! **Knowing when the last holder closed.** The kernel keeps no count we can read, so the
//! server uses open-file-description locks, which live exactly as long as the description:
//! before handing the memfd out it takes an `F_OFD_SETLK` read lock through the fd it hands
//! out (that description travels by SCM_RIGHTS to every holder; the hub keeps no copy of
//! it), and keeps a separate description of the same inode (a re-open through
//! `/proc/self/fd`) as a probe. `F_OFD_GETLK` on the probe reports the read lock for as long
//! as any fd of the handed-out description is open anywhere, in flight in a socket
//! included; when it reports "unlocked", the last holder closed, the charge is released and
//! the probe closed. The server sweeps before every allocation and on the hub's idle tick.
//! A holder could drop the lock on purpose with `F_OFD_SETLK F_UNLCK`; only VMM code can do
//! that (guests cannot issue fcntl on host fds), and VMM seccomp filters must deny the lock
//! commands. Sizes use checked arithmetic: 0 is refused, PAGE-1 charges one page, u64::MAX
//! fails the rounding.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use bulkhead_policy::Quota;
use nix::errno::Errno;

use crate::classify::{classify, ObjKey, F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK};
use crate::hub::handles::VmIdx;

const MFD_NOEXEC_SEAL: libc::c_uint = 0x8;
/// The mode every memfd the hub passes is made with: the creator may write, others
/// (the hub, receivers of other uids) may only reopen it read-only.
pub const MEMFD_MODE: libc::mode_t = 0o644;

/// Why an allocation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShmError {
    /// Size 0.
    #[error("size 0")]
    ZeroSize,
    /// Page rounding overflowed, or the size is beyond what a file can be.
    #[error("size {0} too large")]
    TooLarge(u64),
    /// The VM's shm bytes or count quota would be exceeded.
    #[error("quota exceeded: {used} bytes in {count} objects in use, asked {asked}; quota {quota_bytes} bytes, {quota_count} objects")]
    Quota {
        /// Bytes charged now.
        used: u64,
        /// Objects charged now.
        count: u64,
        /// Bytes asked (rounded).
        asked: u64,
        /// Byte quota.
        quota_bytes: u64,
        /// Count quota.
        quota_count: u64,
    },
    /// A system call failed.
    #[error("{op}: {errno}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
}

#[derive(Debug)]
struct Alloc {
    owner: VmIdx,
    bytes: u64,
    key: ObjKey,
    probe: OwnedFd,
}

/// The server: live allocations and their charges.
#[derive(Debug)]
pub struct MemfdServer {
    allocs: Vec<Alloc>,
    page: u64,
    proc_fd: Option<OwnedFd>,
}

impl Default for MemfdServer {
    fn default() -> Self {
        Self::new()
    }
}

/// `size` rounded up to `page` (a power of two), or `None` on overflow.
pub fn round_to_page(size: u64, page: u64) -> Option<u64> {
    let mask = page.checked_sub(1)?;
    size.checked_add(mask).map(|s| s & !mask)
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> ShmError {
    move |errno| ShmError::Sys { op, errno }
}

impl MemfdServer {
    /// A server with no allocations.
    pub fn new() -> MemfdServer {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        MemfdServer {
            allocs: Vec::new(),
            page,
            proc_fd: open_proc_fd(),
        }
    }

    /// The page size charges are rounded to.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// Bytes and objects charged to `vm` (sweep first for an exact answer).
    pub fn usage(&self, vm: VmIdx) -> (u64, u64) {
        self.allocs
            .iter()
            .filter(|a| a.owner == vm)
            .fold((0u64, 0u64), |(b, c), a| {
                (b.saturating_add(a.bytes), c.saturating_add(1))
            })
    }

    /// Releases the charge of every allocation whose last holder closed; returns their keys
    /// (the handle table forgets them).
    pub fn sweep(&mut self) -> Vec<ObjKey> {
        let mut freed = Vec::new();
        self.allocs.retain(|a| {
            if still_held(a.probe.as_fd()) {
                true
            } else {
                freed.push(a.key);
                false
            }
        });
        freed
    }

    /// A read-only description of `fd` (see [`reopen_readonly`]), locked like every
    /// description the hub passes (the memfd server's charge and the handle table's
    /// tombstones last while it is open).
    pub fn readonly_copy(&self, fd: BorrowedFd<'_>) -> Result<OwnedFd, ShmError> {
        let ro = reopen_readonly(self.proc_fd.as_ref().map(|f| f.as_fd()), fd)?;
        lock_description(ro.as_fd())?;
        Ok(ro)
    }

    /// Is `key` one of this server's live allocations (which it tracks itself)?
    pub fn is_alloc(&self, key: ObjKey) -> bool {
        self.allocs.iter().any(|a| a.key == key)
    }

    /// A probe for a memfd the hub passes: a description of its own (not locked), on which
    /// [`still_held`] reports whether any locked description (see [`lock_description`])
    /// is still open anywhere.
    pub fn probe(&self, fd: BorrowedFd<'_>) -> Result<OwnedFd, ShmError> {
        reopen_readonly(self.proc_fd.as_ref().map(|f| f.as_fd()), fd)
    }

    /// Allocates `size` bytes for `vm` within `quota`. The memfd returned is the only
    /// description holders get; the server keeps only its probe.
    pub fn alloc(
        &mut self,
        vm: VmIdx,
        size: u64,
        quota: &Quota,
    ) -> Result<(OwnedFd, u64, ObjKey), ShmError> {
        if size == 0 {
            return Err(ShmError::ZeroSize);
        }
        let bytes = round_to_page(size, self.page).ok_or(ShmError::TooLarge(size))?;
        let len = i64::try_from(bytes).map_err(|_| ShmError::TooLarge(size))?;
        let (used, count) = self.usage(vm);
        let over = |used: u64, count: u64| ShmError::Quota {
            used,
            count,
            asked: bytes,
            quota_bytes: quota.shm.value,
            quota_count: quota.shm_count.value,
        };
        let fits = used
            .checked_add(bytes)
            .is_some_and(|t| t <= quota.shm.value)
            && count
                .checked_add(1)
                .is_some_and(|c| c <= quota.shm_count.value);
        if !fits {
            return Err(over(used, count));
        }
        let fd = create_memfd()?;
        nix::unistd::ftruncate(&fd, len).map_err(sys("ftruncate"))?;
        // SAFETY: F_ADD_SEALS with an int argument on a memfd we own.
        let r = unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                F_ADD_SEALS,
                F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(sys("fcntl(F_ADD_SEALS)")(Errno::last()));
        }
        ofd_lock(fd.as_fd(), libc::F_RDLCK as libc::c_short)?;
        let probe = reopen_readonly(self.proc_fd.as_ref().map(|f| f.as_fd()), fd.as_fd())?;
        let key = classify(fd.as_fd())
            .map(|c| c.key)
            .map_err(|_| sys("classify new memfd")(Errno::EINVAL))?;
        self.allocs.push(Alloc {
            owner: vm,
            bytes,
            key,
            probe,
        });
        Ok((fd, bytes, key))
    }
}

fn create_memfd() -> Result<OwnedFd, ShmError> {
    let name = CString::new("bulkhead-shm").map_err(|_| sys("memfd name")(Errno::EINVAL))?;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: a valid NUL-terminated name and flags; the result is checked.
    let mut raw = unsafe { libc::memfd_create(name.as_ptr(), base | MFD_NOEXEC_SEAL) };
    if raw < 0 && Errno::last() == Errno::EINVAL {
        // SAFETY: as above, without the flag older kernels do not know.
        raw = unsafe { libc::memfd_create(name.as_ptr(), base) };
    }
    if raw < 0 {
        return Err(sys("memfd_create")(Errno::last()));
    }
    // SAFETY: memfd_create returned a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // 0644 (memfds start 0777, or 0666 under NOEXEC_SEAL): a receiver of another uid can
    // reopen it read-only at most through /proc/self/fd, so a read-only description the hub
    // hands out stays read-only (see `classify`, which refuses group/other-writable ones).
    // SAFETY: fchmod on the fd just created; the result is checked.
    if unsafe { libc::fchmod(fd.as_raw_fd(), MEMFD_MODE) } != 0 {
        return Err(sys("fchmod")(Errno::last()));
    }
    Ok(fd)
}

fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is valid (start 0, len 0 = to EOF).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Takes the hub's OFD read lock on a memfd description it passes (the same lock the
/// memfd server puts on its allocations): it lasts as long as the description is open
/// anywhere, which is what [`still_held`] asks a probe about.
pub fn lock_description(fd: BorrowedFd<'_>) -> Result<(), ShmError> {
    ofd_lock(fd, libc::F_RDLCK as libc::c_short)
}

fn ofd_lock(fd: BorrowedFd<'_>, kind: libc::c_short) -> Result<(), ShmError> {
    let fl = whole_file(kind);
    // SAFETY: F_OFD_SETLK reads one flock struct that lives across the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        return Err(sys("fcntl(F_OFD_SETLK)")(Errno::last()));
    }
    Ok(())
}

/// Does any other open file description still hold a lock on the probe's inode?
pub fn still_held(probe: BorrowedFd<'_>) -> bool {
    let mut fl = whole_file(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and writes one flock struct that lives across the call.
    let r = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    // On an error keep the charge: never release early.
    r < 0 || fl.l_type != libc::F_UNLCK as libc::c_short
}

/// A new, read-only open file description of the same memfd (through `/proc/self/fd`):
/// what the hub hands a receiver whose rights lack WRITE, so the kernel itself refuses
/// writes and writable shared mappings. `proc_fd` is an open `/proc/self/fd` directory
/// (see [`open_proc_fd`]); without it the full path is resolved each time.
pub fn reopen_readonly(
    proc_fd: Option<BorrowedFd<'_>>,
    fd: BorrowedFd<'_>,
) -> Result<OwnedFd, ShmError> {
    let name =
        CString::new(fd.as_raw_fd().to_string()).map_err(|_| sys("fd name")(Errno::EINVAL))?;
    let (dir, path) = match proc_fd {
        Some(d) => (d.as_raw_fd(), name),
        None => (
            libc::AT_FDCWD,
            CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|_| sys("fd path")(Errno::EINVAL))?,
        ),
    };
    // SAFETY: a valid directory fd (or AT_FDCWD) and a NUL-terminated path; the result is
    // checked.
    let raw = unsafe { libc::openat(dir, path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(sys("re-open memfd through /proc/self/fd")(Errno::last()));
    }
    // SAFETY: openat returned a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Opens `/proc/self/fd` as a directory for [`reopen_readonly`] (resolved once, in the
/// process that will use it).
pub fn open_proc_fd() -> Option<OwnedFd> {
    std::fs::File::open("/proc/self/fd").ok().map(OwnedFd::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_policy::QuotaValue;

    fn quota(bytes: u64, count: u64) -> Quota {
        Quota {
            shm: QuotaValue {
                value: bytes,
                from: None,
            },
            shm_count: QuotaValue {
                value: count,
                from: None,
            },
            vfds: QuotaValue {
                value: 100,
                from: None,
            },
        }
    }

    #[test]
    fn rounding_is_checked() {
        assert_eq!(round_to_page(1, 4096), Some(4096));
        assert_eq!(round_to_page(4095, 4096), Some(4096));
        assert_eq!(round_to_page(4096, 4096), Some(4096));
        assert_eq!(round_to_page(u64::MAX, 4096), None);
        assert_eq!(round_to_page(u64::MAX - 4094, 4096), None);
    }

    #[test]
    fn sizes_zero_page_minus_one_and_max() {
        let mut s = MemfdServer::new();
        let page = s.page_size();
        let q = quota(1 << 30, 16);
        assert_eq!(s.alloc(0, 0, &q).unwrap_err(), ShmError::ZeroSize);
        assert!(matches!(
            s.alloc(0, u64::MAX, &q),
            Err(ShmError::TooLarge(_))
        ));
        assert!(matches!(
            s.alloc(0, u64::MAX / 2, &q),
            Err(ShmError::TooLarge(_))
        ));
        assert!(matches!(
            s.alloc(0, u64::MAX / 4, &q),
            Err(ShmError::Quota { .. })
        ));
        let (fd, bytes, _) = s.alloc(0, page - 1, &q).unwrap();
        assert_eq!(bytes, page);
        assert_eq!(s.usage(0), (page, 1));
        let c = classify(fd.as_fd()).unwrap();
        assert_eq!(c.size, page);
        let st = nix::sys::stat::fstat(fd.as_fd()).unwrap();
        assert_eq!(st.st_mode & 0o7777, MEMFD_MODE);
        // Sealed: growing fails.
        assert!(nix::unistd::ftruncate(&fd, (page * 2) as i64).is_err());
    }

    #[test]
    fn charge_lasts_until_the_last_holder_closes() {
        let mut s = MemfdServer::new();
        let page = s.page_size();
        let q = quota(page * 2, 16);
        let (fd, _, _) = s.alloc(7, page, &q).unwrap();
        let dup = fd.try_clone().unwrap();
        drop(fd);
        assert!(s.sweep().is_empty());
        assert_eq!(s.usage(7), (page, 1));
        let (fd2, _, _) = s.alloc(7, page, &q).unwrap();
        assert!(matches!(s.alloc(7, 1, &q), Err(ShmError::Quota { .. })));
        // Another VM is not affected.
        let (_other, _, _) = s.alloc(8, page, &q).unwrap();
        drop(dup);
        assert_eq!(s.sweep().len(), 1);
        assert_eq!(s.usage(7), (page, 1));
        drop(fd2);
        s.sweep();
        assert_eq!(s.usage(7), (0, 0));
    }

    #[test]
    fn many_small_allocations_hit_the_byte_quota() {
        let mut s = MemfdServer::new();
        let page = s.page_size();
        let q = quota(page * 3, 1000);
        let mut keep = Vec::new();
        for _ in 0..3 {
            keep.push(s.alloc(1, 1, &q).unwrap().0);
        }
        assert!(matches!(s.alloc(1, 1, &q), Err(ShmError::Quota { .. })));
    }
}
