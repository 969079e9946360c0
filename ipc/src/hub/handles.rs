//! The hub's handle table: which VM holds which rights on which object.
//!
//! Objects are keyed by `(st_dev, st_ino)` ([`ObjKey`]), because every fd the hub sees is a
//! real kernel object and a VMM can only send fds it holds. The first VM seen sending an
//! object the hub has never seen is its origin and holds every right the fd can carry
//! (TRANSFER and DUP included). Every other VM holds exactly what the hub delivered to it.
//! A VM that sends an object the hub knows but never gave it gets `InvalidId`. Entries go
//! away when the VM releases them, when a transfer without DUP moves them, when the VM
//! goes away, or when the memfd server sees the object's last holder close.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use bulkhead_policy::Rights;

use crate::classify::ObjKey;

/// A VM's index in the hub.
pub type VmIdx = usize;

/// A multiply-rotate hasher for the table's integer keys (inode numbers the kernel assigns
/// and VM indexes the hub assigns: nothing a guest picks), much cheaper than SipHash on the
/// per-frame path.
#[derive(Clone, Copy, Default)]
pub struct KeyHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(K);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map with [`KeyHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// The table.
#[derive(Debug, Default)]
pub struct Handles {
    objects: FastMap<ObjKey, FastMap<VmIdx, Rights>>,
    per_vm: FastMap<VmIdx, u64>,
}

impl Handles {
    /// The rights `vm` has on `key`: its entry, or `origin_rights` if nobody holds the
    /// object yet (then `vm` becomes its origin when the transfer commits); `None` if the
    /// object is known and `vm` holds nothing on it.
    pub fn rights_of(&self, vm: VmIdx, key: ObjKey, origin_rights: Rights) -> Option<Rights> {
        match self.objects.get(&key) {
            None => Some(origin_rights),
            Some(holders) => holders.get(&vm).copied(),
        }
    }

    /// Entries `vm` holds (counted against its `vfds` quota).
    pub fn count(&self, vm: VmIdx) -> u64 {
        self.per_vm.get(&vm).copied().unwrap_or(0)
    }

    /// Does `vm` hold an entry on `key`?
    pub fn holds(&self, vm: VmIdx, key: ObjKey) -> bool {
        self.objects.get(&key).is_some_and(|h| h.contains_key(&vm))
    }

    /// Gives `vm` `rights` on `key` (union with what it has: both were granted).
    pub fn grant(&mut self, vm: VmIdx, key: ObjKey, rights: Rights) {
        let holders = self.objects.entry(key).or_default();
        match holders.get_mut(&vm) {
            Some(r) => *r = *r | rights,
            None => {
                holders.insert(vm, rights);
                let c = self.per_vm.entry(vm).or_insert(0);
                *c = c.saturating_add(1);
            }
        }
    }

    /// Removes `vm`'s entry on `key`.
    pub fn release(&mut self, vm: VmIdx, key: ObjKey) {
        let mut empty = false;
        let mut removed = false;
        if let Some(holders) = self.objects.get_mut(&key) {
            removed = holders.remove(&vm).is_some();
            empty = holders.is_empty();
        }
        if removed {
            self.dec(vm);
        }
        if empty {
            self.objects.remove(&key);
        }
    }

    /// Forgets every entry of `vm` (the VM went away).
    pub fn forget_vm(&mut self, vm: VmIdx) {
        self.objects.retain(|_, holders| {
            holders.remove(&vm);
            !holders.is_empty()
        });
        self.per_vm.remove(&vm);
    }

    /// Forgets an object entirely (its last holder closed it).
    pub fn forget_object(&mut self, key: ObjKey) {
        if let Some(holders) = self.objects.remove(&key) {
            for vm in holders.keys() {
                self.dec(*vm);
            }
        }
    }

    fn dec(&mut self, vm: VmIdx) {
        if let Some(c) = self.per_vm.get_mut(&vm) {
            *c = c.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_then_holders() {
        let k = ObjKey { dev: 1, ino: 2 };
        let mut h = Handles::default();
        assert_eq!(h.rights_of(0, k, Rights::ALL), Some(Rights::ALL));
        h.grant(0, k, Rights::ALL);
        h.grant(1, k, Rights::READ);
        assert_eq!(h.rights_of(1, k, Rights::ALL), Some(Rights::READ));
        assert_eq!(h.rights_of(2, k, Rights::ALL), None);
        assert_eq!(h.count(1), 1);
        h.release(1, k);
        assert_eq!(h.count(1), 0);
        assert_eq!(h.rights_of(1, k, Rights::ALL), None);
        h.forget_vm(0);
        assert_eq!(h.rights_of(2, k, Rights::READ), Some(Rights::READ));
    }
}
