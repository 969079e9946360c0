//! What an fd really is, decided by the kernel's answers and never by a claim.
//!
//! `classify` asks `fstat(2)` for the file type, `fcntl(F_GETFL)` for the access mode and
//! `fcntl(F_GET_SEALS)` for memfd seals, and derives the fd's [`FdType`] and the largest set
//! of rights it can physically carry. The hub runs this on every fd of every frame; the
//! sender's claim about the type is never consulted.
//!
//! | kernel says | type | rights it can carry |
//! |---|---|---|
//! | `S_ISSOCK` | socket | send, recv, send-fds |
//! | `S_ISFIFO` + `O_RDONLY` | pipe (read end) | read |
//! | `S_ISFIFO` + `O_WRONLY` | pipe (write end) | write |
//! | `S_ISREG` + seals incl. GROW and SHRINK | memfd | read, map; write unless write-sealed |
//! | an `O_PATH` descriptor (of anything) | refused | — |
//! | `S_ISREG` whose mode has group or other write (`0o022`) | refused | — |
//! | anything else | refused | — |
//!
//! TRANSFER and DUP are bookkeeping rights (the hub's, not the kernel's), so they are always
//! in the "can carry" set; whether a holder has them is the handle table's business.
//! A memfd without GROW and SHRINK seals is refused: a peer could shrink it under a mapping
//! and make the receiver's VMM fault (SIGBUS).
//!
//! **Reopening.** Anyone holding an fd to a memfd can open a *new* description of it through
//! `/proc/self/fd/N`, with whatever access the file's mode allows the opener. So the hub's
//! read-only attenuation (a new `O_RDONLY` description, see
//! [`crate::hub::memfd_server::reopen_readonly`]) only holds if a receiver cannot reopen the
//! file writable: memfds are made mode 0644 by their creators (the VMM and the memfd server;
//! owner = the creator, others read-only, so the hub can still reopen read-only), and a
//! regular file whose mode grants group or other write is refused here. This relies on DAC,
//! so it binds receivers that run as another, unprivileged uid (a root VMM bypasses it).
//! `O_PATH` descriptors are refused outright: they carry no access mode (`F_GETFL` would
//! read as `O_RDONLY`) and exist only to be reopened.

use std::os::fd::{AsRawFd, BorrowedFd};

use bulkhead_policy::{FdType, Rights};
use nix::errno::Errno;
use nix::sys::stat::{fstat, SFlag};

/// `fcntl` command: read the seals of a memfd.
pub const F_GET_SEALS: libc::c_int = 1034;
/// `fcntl` command: add seals to a memfd.
pub const F_ADD_SEALS: libc::c_int = 1033;
/// Seal: no more seals may be added.
pub const F_SEAL_SEAL: libc::c_int = 0x1;
/// Seal: the file may not shrink.
pub const F_SEAL_SHRINK: libc::c_int = 0x2;
/// Seal: the file may not grow.
pub const F_SEAL_GROW: libc::c_int = 0x4;
/// Seal: no writes at all.
pub const F_SEAL_WRITE: libc::c_int = 0x8;
/// Seal: no new writable mappings or writes.
pub const F_SEAL_FUTURE_WRITE: libc::c_int = 0x10;

/// Identity of the object behind an fd: `(st_dev, st_ino)`. Two fds with the same key refer
/// to the same pipe, socket or memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    /// Device of the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl ObjKey {
    /// The object `fd` refers to (one fstat).
    pub fn of(fd: BorrowedFd<'_>) -> nix::Result<ObjKey> {
        fstat(fd).map(|st| ObjKey::from_stat(&st))
    }

    /// The object a stat describes.
    pub fn from_stat(st: &libc::stat) -> ObjKey {
        ObjKey {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

/// The precise kind of an fd (finer than [`FdType`]: a pipe has two ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdKind {
    /// A sealed memfd.
    Memfd,
    /// The read end of a pipe.
    PipeRead,
    /// The write end of a pipe.
    PipeWrite,
    /// A socket.
    Socket,
}

impl FdKind {
    /// The policy type of this kind.
    pub const fn fd_type(self) -> FdType {
        match self {
            FdKind::Memfd => FdType::Memfd,
            FdKind::PipeRead | FdKind::PipeWrite => FdType::Pipe,
            FdKind::Socket => FdType::Socket,
        }
    }
}

/// What `classify` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// The kind.
    pub kind: FdKind,
    /// The object's identity.
    pub key: ObjKey,
    /// The most the fd can carry (always includes TRANSFER and DUP).
    pub max_rights: Rights,
    /// Size in bytes (memfds; 0 otherwise).
    pub size: u64,
}

impl Classified {
    /// The policy type.
    pub const fn fd_type(&self) -> FdType {
        self.kind.fd_type()
    }
}

/// Why an fd was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// A system call failed on the fd.
    #[error("{op}: {errno}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// The error.
        errno: Errno,
    },
    /// The object is not a type the hub passes (directories, devices, plain files, …).
    #[error("unsupported fd kind (mode {mode:#o})")]
    Unsupported {
        /// `st_mode`.
        mode: u32,
    },
    /// A regular file that is not a sealable memfd.
    #[error("regular file that is not a memfd")]
    NotMemfd,
    /// A memfd without GROW and SHRINK seals.
    #[error("memfd without grow/shrink seals (seals {seals:#x})")]
    UnsealedMemfd {
        /// The seals it has.
        seals: i32,
    },
    /// A FIFO opened read-write is neither a read end nor a write end.
    #[error("fifo opened read-write is not a pipe end")]
    AmbiguousPipe,
    /// A memfd opened write-only cannot be mapped.
    #[error("memfd opened write-only")]
    WriteOnlyMemfd,
    /// An `O_PATH` descriptor: no access of its own, only a handle to reopen the object.
    #[error("O_PATH descriptor")]
    PathOnly,
    /// A memfd (or other regular file) whose mode lets group or others write it: a
    /// receiver could reopen it writable through `/proc/self/fd`.
    #[error("memfd mode {mode:#o} lets group or others write (could be reopened writable)")]
    WritableByOthers {
        /// The permission bits.
        mode: u32,
    },
}

const BOOKKEEPING: Rights = Rights::TRANSFER.union(Rights::DUP);

/// Classifies `fd` from the kernel's view of it.
pub fn classify(fd: BorrowedFd<'_>) -> Result<Classified, ClassifyError> {
    let st = fstat(fd).map_err(|errno| ClassifyError::Sys { op: "fstat", errno })?;
    let key = ObjKey::from_stat(&st);
    let fmt = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    let fl = status_flags(fd)?;
    if fl & libc::O_PATH != 0 {
        return Err(ClassifyError::PathOnly);
    }
    let accmode = fl & libc::O_ACCMODE;
    let (kind, max, size) = if fmt == SFlag::S_IFSOCK {
        (
            FdKind::Socket,
            Rights::SEND | Rights::RECV | Rights::SEND_FDS,
            0,
        )
    } else if fmt == SFlag::S_IFIFO {
        match accmode {
            libc::O_RDONLY => (FdKind::PipeRead, Rights::READ, 0),
            libc::O_WRONLY => (FdKind::PipeWrite, Rights::WRITE, 0),
            _ => return Err(ClassifyError::AmbiguousPipe),
        }
    } else if fmt == SFlag::S_IFREG {
        if st.st_mode & (libc::S_IWGRP | libc::S_IWOTH) != 0 {
            return Err(ClassifyError::WritableByOthers {
                mode: st.st_mode & 0o7777,
            });
        }
        let seals = get_seals(fd)?;
        if seals & (F_SEAL_GROW | F_SEAL_SHRINK) != F_SEAL_GROW | F_SEAL_SHRINK {
            return Err(ClassifyError::UnsealedMemfd { seals });
        }
        let mut max = match accmode {
            libc::O_RDONLY => Rights::READ | Rights::MAP,
            libc::O_RDWR => Rights::READ | Rights::WRITE | Rights::MAP,
            _ => return Err(ClassifyError::WriteOnlyMemfd),
        };
        if seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE) != 0 {
            max = max.difference(Rights::WRITE);
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        (FdKind::Memfd, max, size)
    } else {
        return Err(ClassifyError::Unsupported { mode: st.st_mode });
    };
    Ok(Classified {
        kind,
        key,
        max_rights: max | BOOKKEEPING,
        size,
    })
}

fn status_flags(fd: BorrowedFd<'_>) -> Result<libc::c_int, ClassifyError> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's status flags.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(ClassifyError::Sys {
            op: "fcntl(F_GETFL)",
            errno: Errno::last(),
        });
    }
    Ok(fl)
}

fn get_seals(fd: BorrowedFd<'_>) -> Result<libc::c_int, ClassifyError> {
    // SAFETY: F_GET_SEALS takes no argument and only reads the file's seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), F_GET_SEALS) };
    if seals < 0 {
        return match Errno::last() {
            Errno::EINVAL => Err(ClassifyError::NotMemfd),
            errno => Err(ClassifyError::Sys {
                op: "fcntl(F_GET_SEALS)",
                errno,
            }),
        };
    }
    Ok(seals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn memfd(seals: libc::c_int, size: i64) -> OwnedFd {
        // SAFETY: a NUL-terminated name and valid flags; the fd returned is checked.
        let raw = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0);
        // SAFETY: memfd_create returned a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        nix::unistd::ftruncate(&fd, size).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS with an int argument on our own memfd.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_ADD_SEALS, seals) };
            assert_eq!(r, 0);
        }
        fd
    }

    #[test]
    fn sealed_memfd_is_memfd_rw() {
        let fd = memfd(F_SEAL_GROW | F_SEAL_SHRINK, 4096);
        let c = classify(fd.as_fd()).unwrap();
        assert_eq!(c.kind, FdKind::Memfd);
        assert_eq!(c.size, 4096);
        assert!(c
            .max_rights
            .contains(Rights::READ | Rights::WRITE | Rights::MAP));
        assert!(!c.max_rights.contains(Rights::EXEC));
    }

    #[test]
    fn write_sealed_memfd_cannot_carry_write() {
        let fd = memfd(F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_WRITE, 4096);
        let c = classify(fd.as_fd()).unwrap();
        assert!(!c.max_rights.contains(Rights::WRITE));
    }

    #[test]
    fn unsealed_memfd_refused() {
        let fd = memfd(0, 4096);
        assert!(matches!(
            classify(fd.as_fd()),
            Err(ClassifyError::UnsealedMemfd { .. })
        ));
        let fd = memfd(F_SEAL_GROW, 4096);
        assert!(matches!(
            classify(fd.as_fd()),
            Err(ClassifyError::UnsealedMemfd { .. })
        ));
    }

    #[test]
    fn memfd_writable_by_group_or_others_refused() {
        for mode in [0o666, 0o646, 0o664, 0o777] {
            let fd = memfd(F_SEAL_GROW | F_SEAL_SHRINK, 4096);
            nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(mode)).unwrap();
            assert_eq!(
                classify(fd.as_fd()),
                Err(ClassifyError::WritableByOthers { mode }),
                "{mode:o}"
            );
        }
        for mode in [0o644, 0o600, 0o444] {
            let fd = memfd(F_SEAL_GROW | F_SEAL_SHRINK, 4096);
            nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(mode)).unwrap();
            assert_eq!(
                classify(fd.as_fd()).unwrap().kind,
                FdKind::Memfd,
                "{mode:o}"
            );
        }
    }

    #[test]
    fn o_path_descriptors_refused() {
        let m = memfd(F_SEAL_GROW | F_SEAL_SHRINK, 4096);
        let (r, _w) = nix::unistd::pipe().unwrap();
        for fd in [m.as_fd(), r.as_fd()] {
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            let p = nix::fcntl::open(
                path.as_str(),
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
            assert_eq!(classify(p.as_fd()), Err(ClassifyError::PathOnly));
        }
    }

    #[test]
    fn pipe_ends_by_access_mode() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let cr = classify(r.as_fd()).unwrap();
        let cw = classify(w.as_fd()).unwrap();
        assert_eq!(cr.kind, FdKind::PipeRead);
        assert_eq!(cw.kind, FdKind::PipeWrite);
        assert_eq!(cr.key, cw.key);
        assert!(!cr.max_rights.contains(Rights::WRITE));
        assert!(!cw.max_rights.contains(Rights::READ));
    }

    #[test]
    fn socket_and_plain_file() {
        let (a, _b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        assert_eq!(classify(a.as_fd()).unwrap().kind, FdKind::Socket);
        let f = tempfile::tempfile().unwrap();
        assert!(matches!(
            classify(f.as_fd()),
            Err(ClassifyError::NotMemfd) | Err(ClassifyError::UnsealedMemfd { .. })
        ));
        let d = std::fs::File::open("/").unwrap();
        assert!(matches!(
            classify(d.as_fd()),
            Err(ClassifyError::Unsupported { .. })
        ));
    }
}
