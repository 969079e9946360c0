//! The vocabulary of capability-typed fds: [`FdType`] and [`Rights`].
//!
//! These types are shared with the hub (crate `bulkhead-ipc`), which stores a `Rights` value
//! in every handle-table entry. The policy crate owns them so that there is exactly one
//! definition of what each bit means and which bits are valid for which fd type.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of object behind a virtio_wl fd. The host decides the type when it creates the
/// object; it is never taken from a guest claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FdType {
    /// Shared memory from the memfd server (sealed against grow/shrink, no exec).
    Memfd,
    /// One end of a pipe (a read end or a write end).
    Pipe,
    /// A dmabuf (GPU buffer).
    Dmabuf,
    /// A connected socket.
    Socket,
    /// A sync fence.
    Fence,
}

impl FdType {
    /// Every fd type, in canonical order (the order `fmt` writes them in).
    pub const ALL: [FdType; 5] = [
        FdType::Memfd,
        FdType::Pipe,
        FdType::Dmabuf,
        FdType::Socket,
        FdType::Fence,
    ];

    /// The policy-language name of the type.
    pub const fn name(self) -> &'static str {
        match self {
            FdType::Memfd => "memfd",
            FdType::Pipe => "pipe",
            FdType::Dmabuf => "dmabuf",
            FdType::Socket => "socket",
            FdType::Fence => "fence",
        }
    }

    /// Parse a policy-language type name.
    pub fn from_name(name: &str) -> Option<FdType> {
        FdType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Index of the type in [`FdType::ALL`] (used for per-type tables).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The rights that mean something for this type. Rights outside the mask are invalid for
    /// the type everywhere: in policy files, in transfer requests, in the handle table.
    pub const fn valid_rights(self) -> Rights {
        let common = Rights::TRANSFER.0 | Rights::DUP.0;
        Rights(
            common
                | match self {
                    FdType::Memfd => {
                        Rights::READ.0
                            | Rights::WRITE.0
                            | Rights::MAP.0
                            | Rights::EXEC.0
                            | Rights::RESIZE.0
                    }
                    FdType::Pipe => Rights::READ.0 | Rights::WRITE.0,
                    FdType::Dmabuf => Rights::READ.0 | Rights::WRITE.0 | Rights::MAP.0,
                    FdType::Socket => Rights::SEND.0 | Rights::RECV.0 | Rights::SEND_FDS.0,
                    FdType::Fence => Rights::WAIT.0 | Rights::SIGNAL.0,
                },
        )
    }

    /// The rights a policy may grant for this type: the validity mask minus the rights no
    /// policy may grant in v1 (EXEC is reserved, RESIZE is never granted).
    pub const fn grantable_rights(self) -> Rights {
        Rights(self.valid_rights().0 & !Rights::NEVER_GRANTED.0)
    }
}

impl fmt::Display for FdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of rights on one fd, a `u32` bit set.
///
/// Operations are the usual set operations; none of them can fail or panic.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rights(u32);

impl Rights {
    /// No rights.
    pub const NONE: Rights = Rights(0);
    /// Read data (memfd, dmabuf, pipe read end).
    pub const READ: Rights = Rights(1 << 0);
    /// Write data (memfd, dmabuf, pipe write end).
    pub const WRITE: Rights = Rights(1 << 1);
    /// Map into guest memory (memfd, dmabuf). With READ only: a read-only memslot.
    pub const MAP: Rights = Rights(1 << 2);
    /// Reserved: executable mappings. Never granted in v1.
    pub const EXEC: Rights = Rights(1 << 3);
    /// Change the size. Never granted: the memfd server seals GROW and SHRINK.
    pub const RESIZE: Rights = Rights(1 << 4);
    /// Send bytes on a socket.
    pub const SEND: Rights = Rights(1 << 5);
    /// Receive bytes from a socket.
    pub const RECV: Rights = Rights(1 << 6);
    /// Carry fds over a socket (seL4's Grant right).
    pub const SEND_FDS: Rights = Rights(1 << 7);
    /// Wait on a fence.
    pub const WAIT: Rights = Rights(1 << 8);
    /// Signal a fence.
    pub const SIGNAL: Rights = Rights(1 << 9);
    /// Send the fd onward to another VM.
    pub const TRANSFER: Rights = Rights(1 << 10);
    /// Keep a copy when transferring (otherwise a transfer is a move).
    pub const DUP: Rights = Rights(1 << 11);

    /// Rights that no policy may grant in v1.
    pub const NEVER_GRANTED: Rights = Rights(Self::EXEC.0 | Self::RESIZE.0);
    /// Every defined bit.
    pub const ALL: Rights = Rights((1 << 12) - 1);

    /// Names of the individual rights, in bit order, as written in policy files.
    pub const NAMES: [(Rights, &'static str); 12] = [
        (Rights::READ, "read"),
        (Rights::WRITE, "write"),
        (Rights::MAP, "map"),
        (Rights::EXEC, "exec"),
        (Rights::RESIZE, "resize"),
        (Rights::SEND, "send"),
        (Rights::RECV, "recv"),
        (Rights::SEND_FDS, "send-fds"),
        (Rights::WAIT, "wait"),
        (Rights::SIGNAL, "signal"),
        (Rights::TRANSFER, "transfer"),
        (Rights::DUP, "dup"),
    ];

    /// Build from raw bits; bits outside [`Rights::ALL`] are dropped.
    pub const fn from_bits_truncate(bits: u32) -> Rights {
        Rights(bits & Self::ALL.0)
    }

    /// Build from raw bits; `None` if an undefined bit is set.
    pub const fn from_bits(bits: u32) -> Option<Rights> {
        if bits & !Self::ALL.0 == 0 {
            Some(Rights(bits))
        } else {
            None
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// True if no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True if every bit of `other` is set in `self`.
    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if `self` ⊆ `other`.
    pub const fn is_subset_of(self, other: Rights) -> bool {
        other.contains(self)
    }

    /// `self ∪ other`.
    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// `self ∩ other`.
    pub const fn intersection(self, other: Rights) -> Rights {
        Rights(self.0 & other.0)
    }

    /// `self \ other`.
    pub const fn difference(self, other: Rights) -> Rights {
        Rights(self.0 & !other.0)
    }

    /// The name of a single right, if `self` is exactly one known bit.
    pub fn single_name(self) -> Option<&'static str> {
        Self::NAMES
            .iter()
            .find(|(r, _)| *r == self)
            .map(|(_, n)| *n)
    }

    /// Parse one right name or alias (`ro`, `rw`, `r`, `w`).
    pub fn from_name(name: &str) -> Option<Rights> {
        match name {
            "ro" => Some(Rights::READ.union(Rights::MAP)),
            "rw" => Some(Rights::READ.union(Rights::WRITE).union(Rights::MAP)),
            "r" => Some(Rights::READ),
            "w" => Some(Rights::WRITE),
            _ => Self::NAMES
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(r, _)| *r),
        }
    }

    /// Iterate over the names of the set bits, in bit order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .into_iter()
            .filter(move |(r, _)| self.contains(*r))
            .map(|(_, n)| n)
    }
}

impl std::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, rhs: Rights) -> Rights {
        self.union(rhs)
    }
}

impl std::ops::BitAnd for Rights {
    type Output = Rights;
    fn bitand(self, rhs: Rights) -> Rights {
        self.intersection(rhs)
    }
}

/// Canonical text: the right names joined by `+` (`read+map`), or `none`.
impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for n in self.names() {
            if !first {
                f.write_str("+")?;
            }
            f.write_str(n)?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rights({self})")
    }
}

/// The direction of a transfer on a connection: `C2s` is client → provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// From the connecting VM to the service provider.
    C2s,
    /// From the service provider back to the connecting VM.
    S2c,
}

impl Direction {
    /// `c2s` or `s2c`.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::C2s => "c2s",
            Direction::S2c => "s2c",
        }
    }

    /// Parse `c2s` / `s2c`.
    pub fn from_name(s: &str) -> Option<Direction> {
        match s {
            "c2s" => Some(Direction::C2s),
            "s2c" => Some(Direction::S2c),
            _ => None,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-type rights allowed in one direction of a service: the fd contract.
///
/// A type whose entry is empty may not be sent at all.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FdCaps([Rights; 5]);

impl FdCaps {
    /// Nothing may be sent.
    pub const NONE: FdCaps = FdCaps([Rights::NONE; 5]);

    /// Rights allowed for `t` (empty: the type may not be sent).
    pub fn get(&self, t: FdType) -> Rights {
        self.0.get(t.index()).copied().unwrap_or(Rights::NONE)
    }

    /// Set the rights for `t`.
    pub fn set(&mut self, t: FdType, r: Rights) {
        if let Some(slot) = self.0.get_mut(t.index()) {
            *slot = r;
        }
    }

    /// True if no type may be sent.
    pub fn is_none(&self) -> bool {
        self.0.iter().all(|r| r.is_empty())
    }

    /// Per-type intersection.
    pub fn intersect(&self, other: &FdCaps) -> FdCaps {
        let mut out = FdCaps::NONE;
        for t in FdType::ALL {
            out.set(t, self.get(t) & other.get(t));
        }
        out
    }

    /// Per-type union.
    pub fn union(&self, other: &FdCaps) -> FdCaps {
        let mut out = FdCaps::NONE;
        for t in FdType::ALL {
            out.set(t, self.get(t) | other.get(t));
        }
        out
    }

    /// True if every type's rights in `self` are a subset of `other`'s.
    pub fn is_subset_of(&self, other: &FdCaps) -> bool {
        FdType::ALL
            .into_iter()
            .all(|t| self.get(t).is_subset_of(other.get(t)))
    }

    /// The (type, rights) pairs that are allowed, in canonical order.
    pub fn entries(&self) -> impl Iterator<Item = (FdType, Rights)> + '_ {
        FdType::ALL
            .into_iter()
            .map(|t| (t, self.get(t)))
            .filter(|(_, r)| !r.is_empty())
    }
}

/// Canonical text: `memfd:read+map,pipe:write` or `none`.
impl fmt::Display for FdCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        let mut first = true;
        for (t, r) in self.entries() {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "{t}:{r}")?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Debug for FdCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FdCaps({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_expand() {
        assert_eq!(Rights::from_name("ro"), Some(Rights::READ | Rights::MAP));
        assert_eq!(
            Rights::from_name("rw"),
            Some(Rights::READ | Rights::WRITE | Rights::MAP)
        );
        assert_eq!(Rights::from_name("send-fds"), Some(Rights::SEND_FDS));
        assert_eq!(Rights::from_name("bogus"), None);
    }

    #[test]
    fn validity_masks() {
        assert!(!FdType::Pipe.valid_rights().contains(Rights::MAP));
        assert!(FdType::Memfd.valid_rights().contains(Rights::EXEC));
        assert!(!FdType::Memfd.grantable_rights().contains(Rights::EXEC));
        assert!(!FdType::Memfd.grantable_rights().contains(Rights::RESIZE));
        for t in FdType::ALL {
            assert!(t.valid_rights().contains(Rights::TRANSFER | Rights::DUP));
        }
        assert!(FdType::Socket.valid_rights().contains(Rights::SEND_FDS));
        assert!(!FdType::Fence.valid_rights().contains(Rights::READ));
    }

    #[test]
    fn display_is_canonical() {
        assert_eq!((Rights::MAP | Rights::READ).to_string(), "read+map");
        assert_eq!(Rights::NONE.to_string(), "none");
        let mut c = FdCaps::NONE;
        c.set(FdType::Pipe, Rights::WRITE);
        c.set(FdType::Memfd, Rights::READ);
        assert_eq!(c.to_string(), "memfd:read,pipe:write");
        assert_eq!(FdCaps::NONE.to_string(), "none");
    }

    #[test]
    fn bits_roundtrip() {
        assert_eq!(Rights::from_bits(1 << 20), None);
        assert_eq!(Rights::from_bits_truncate(u32::MAX), Rights::ALL);
        assert_eq!(Rights::from_bits(Rights::DUP.bits()), Some(Rights::DUP));
    }
}
