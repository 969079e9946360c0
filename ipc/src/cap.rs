//! Typed capabilities: an owned fd, its checked kind and the rights its holder has.
//!
//! `Cap<Memfd>`, `Cap<PipeReader>`, `Cap<PipeWriter>` and `Cap<Socket>` can only be built
//! from an fd that [`crate::classify`] confirms is of that kind, with rights the fd can
//! physically carry. Sending borrows the cap ([`Cap::wire`] gives a `BorrowedFd` tied to the
//! cap's lifetime), so a cap cannot be closed while a send names it, and nothing can name a
//! closed or foreign fd. Rights only shrink: [`Cap::attenuate`] refuses to add a bit.

use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use bulkhead_policy::{FdType, Rights};

use crate::classify::{classify, Classified, ClassifyError, FdKind};

/// A kind of capability (a marker type).
pub trait CapKind {
    /// The classified kind this marker stands for.
    const KIND: FdKind;
    /// The policy type.
    const FD_TYPE: FdType = Self::KIND.fd_type();
}

/// Marker: a sealed memfd.
#[derive(Debug)]
pub enum Memfd {}
/// Marker: the read end of a pipe.
#[derive(Debug)]
pub enum PipeReader {}
/// Marker: the write end of a pipe.
#[derive(Debug)]
pub enum PipeWriter {}
/// Marker: a socket.
#[derive(Debug)]
pub enum Socket {}

impl CapKind for Memfd {
    const KIND: FdKind = FdKind::Memfd;
}
impl CapKind for PipeReader {
    const KIND: FdKind = FdKind::PipeRead;
}
impl CapKind for PipeWriter {
    const KIND: FdKind = FdKind::PipeWrite;
}
impl CapKind for Socket {
    const KIND: FdKind = FdKind::Socket;
}

/// Why a cap could not be built or narrowed.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// The fd is not of a passable kind.
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// The fd is of another kind than the cap type.
    #[error("fd is a {found:?}, not a {wanted:?}")]
    WrongKind {
        /// What the kernel says it is.
        found: FdKind,
        /// What the cap type needs.
        wanted: FdKind,
    },
    /// The rights asked for are more than the fd (or the cap) carries.
    #[error("rights {asked} exceed what the fd carries ({allowed})")]
    RightsTooWide {
        /// Asked for.
        asked: Rights,
        /// The most allowed.
        allowed: Rights,
    },
}

/// An fd of kind `K` with the rights its holder has.
#[derive(Debug)]
pub struct Cap<K: CapKind> {
    fd: OwnedFd,
    rights: Rights,
    info: Classified,
    kind: PhantomData<K>,
}

impl<K: CapKind> Cap<K> {
    /// Wraps `fd` after checking its kind and that `rights` ⊆ what it can carry (and ⊆ the
    /// type's validity mask).
    pub fn new(fd: OwnedFd, rights: Rights) -> Result<Self, CapError> {
        let info = classify(fd.as_fd())?;
        if info.kind != K::KIND {
            return Err(CapError::WrongKind {
                found: info.kind,
                wanted: K::KIND,
            });
        }
        let allowed = info.max_rights & K::FD_TYPE.valid_rights();
        if !rights.is_subset_of(allowed) {
            return Err(CapError::RightsTooWide {
                asked: rights,
                allowed,
            });
        }
        Ok(Cap {
            fd,
            rights,
            info,
            kind: PhantomData,
        })
    }

    /// Wraps `fd` with every right it can carry.
    pub fn with_all_rights(fd: OwnedFd) -> Result<Self, CapError> {
        let info = classify(fd.as_fd())?;
        let rights = info.max_rights & K::FD_TYPE.valid_rights();
        Self::new(fd, rights)
    }

    /// The holder's rights.
    pub fn rights(&self) -> Rights {
        self.rights
    }

    /// What classification found when the cap was built.
    pub fn info(&self) -> &Classified {
        &self.info
    }

    /// Narrows the rights; `rights` must be a subset of the current ones.
    pub fn attenuate(self, rights: Rights) -> Result<Self, CapError> {
        if !rights.is_subset_of(self.rights) {
            return Err(CapError::RightsTooWide {
                asked: rights,
                allowed: self.rights,
            });
        }
        Ok(Cap { rights, ..self })
    }

    /// The fd and the rights to request, for a send. The borrow keeps the cap alive (and
    /// open) until the send is done.
    pub fn wire(&self) -> (BorrowedFd<'_>, Rights) {
        (self.fd.as_fd(), self.rights)
    }

    /// Gives up the type and rights, returning the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl<K: CapKind> AsFd for Cap<K> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_checked() {
        let (r, w) = nix::unistd::pipe().unwrap();
        assert!(Cap::<PipeReader>::new(r, Rights::READ).is_ok());
        assert!(matches!(
            Cap::<PipeReader>::new(w, Rights::READ),
            Err(CapError::WrongKind { .. })
        ));
    }

    #[test]
    fn rights_only_shrink() {
        let (_r, w) = nix::unistd::pipe().unwrap();
        assert!(matches!(
            Cap::<PipeWriter>::new(w.try_clone().unwrap(), Rights::READ),
            Err(CapError::RightsTooWide { .. })
        ));
        let c = Cap::<PipeWriter>::with_all_rights(w).unwrap();
        assert_eq!(c.rights(), Rights::WRITE | Rights::TRANSFER | Rights::DUP);
        let c = c.attenuate(Rights::WRITE).unwrap();
        assert!(matches!(
            c.attenuate(Rights::WRITE | Rights::TRANSFER),
            Err(CapError::RightsTooWide { .. })
        ));
    }
}
