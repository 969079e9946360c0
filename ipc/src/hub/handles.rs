//! The hub's handle table: which VM holds which rights on which object.
//!
//! Objects are keyed by `(st_dev, st_ino)` ([`ObjKey`]), because every fd the hub sees is a
//! real kernel object and a VMM can only send fds it holds. The first VM seen sending an
//! object the hub has never seen is its origin and holds every right the fd can carry
//! (TRANSFER and DUP included). Every other VM holds exactly what the hub delivered to it.
//! A VM that sends an object the hub knows but never gave it gets `InvalidId`. Entries go
//! away when the VM releases them, when a transfer without DUP moves them, when the VM
//! goes away, or when the memfd server sees the object's last holder close.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

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

/// Most tombstones kept at once (see [`Handles`]), a backstop behind the per-VM budget: a
/// tombstone made when a VM goes away (its entries must go) while the table is full is not
/// kept (logged).
pub const MAX_TOMBSTONES: usize = 16384;

/// One object: who holds what, and what the hub ever delivered of it.
#[derive(Debug, Default)]
struct Obj {
    holders: FastMap<VmIdx, Rights>,
    /// The intersection of the rights of every attenuated delivery (`None`: never
    /// delivered with less than the fd can carry).
    cap: Option<Rights>,
    /// VMs that held an entry on it (a VM leaves the list when it goes away or restarts:
    /// its fds are closed then).
    ever: Vec<VmIdx>,
    /// A description of the object the hub keeps to ask whether any description it passed
    /// is still open (memfds only: see [`crate::hub::memfd_server::still_held`]).
    probe: Option<OwnedFd>,
}

/// The table.
///
/// **Tombstones.** When the last entry on an object goes (every holder released it, or went
/// away) while descriptions of it may still be open (a VMM that lied in `Release`, or one
/// that moved it without DUP and whose guest still holds the vfd), forgetting it would make
/// the next VM to send it its origin, with every right (TRANSFER and DUP included): rights
/// laundering. So an object the hub ever delivered with attenuated rights becomes a
/// tombstone instead: whoever sends it next gets at most the intersection of the rights
/// the hub delivered of it. A tombstone goes when no description can be open any more: for
/// memfds, when the probe (an OFD-lock probe, like the memfd server's) sees no description
/// the hub passed still open (a live object whose probe says so goes too: every holder
/// closed it); for others (pipes, sockets: no probe can be opened without
/// becoming a reader or writer), when every VM that ever held an entry on it has gone away
/// or restarted; and when the memfd server sees the last holder of its allocation close.
///
/// **Tombstone budget.** A tombstone is charged to every VM that ever held the object (its
/// `ever` list: those are the VMs that may still hold a description of it). A `Release`
/// that would make a tombstone charged to a VM already at its budget is not honoured: the
/// releasing VM keeps its entry, still counted against its `vfds`. So a VM that churns
/// attenuated objects (and whoever helps it) exhausts only their own budgets and quotas.
#[derive(Debug)]
pub struct Handles {
    objects: FastMap<ObjKey, Obj>,
    tombs: FastMap<ObjKey, Obj>,
    per_vm: FastMap<VmIdx, u64>,
    /// Tombstones charged to each VM.
    tombs_of: FastMap<VmIdx, usize>,
    /// Most tombstones charged to one VM.
    tomb_budget: usize,
}

impl Default for Handles {
    fn default() -> Handles {
        Handles::new(MAX_TOMBSTONES)
    }
}

impl Handles {
    /// An empty table with at most `tomb_budget` tombstones charged to one VM.
    pub fn new(tomb_budget: usize) -> Handles {
        Handles {
            objects: FastMap::default(),
            tombs: FastMap::default(),
            per_vm: FastMap::default(),
            tombs_of: FastMap::default(),
            tomb_budget,
        }
    }

    /// Tombstones charged to `vm`.
    pub fn tombstones_of(&self, vm: VmIdx) -> usize {
        self.tombs_of.get(&vm).copied().unwrap_or(0)
    }

    fn charge_tomb(&mut self, ever: &[VmIdx]) {
        for vm in ever {
            *self.tombs_of.entry(*vm).or_insert(0) += 1;
        }
    }

    fn discharge_tomb(&mut self, ever: &[VmIdx]) {
        discharge(&mut self.tombs_of, ever);
    }

    /// The rights `vm` has on `key`: its entry; or, if nobody holds the object, the
    /// `origin_rights` limited by what the hub ever delivered of it (a tombstone), and `vm`
    /// becomes a holder with them when the transfer commits; `None` if the object is held
    /// and `vm` holds nothing on it.
    pub fn rights_of(&self, vm: VmIdx, key: ObjKey, origin_rights: Rights) -> Option<Rights> {
        match self.objects.get(&key) {
            Some(obj) => obj.holders.get(&vm).copied(),
            None => match self.tombs.get(&key).and_then(|t| t.cap) {
                Some(cap) => Some(origin_rights & cap),
                None => Some(origin_rights),
            },
        }
    }

    /// Entries `vm` holds (counted against its `vfds` quota).
    pub fn count(&self, vm: VmIdx) -> u64 {
        self.per_vm.get(&vm).copied().unwrap_or(0)
    }

    /// Does `vm` hold an entry on `key`?
    pub fn holds(&self, vm: VmIdx, key: ObjKey) -> bool {
        self.objects
            .get(&key)
            .is_some_and(|o| o.holders.contains_key(&vm))
    }

    /// Tombstones kept now.
    pub fn tombstones(&self) -> usize {
        self.tombs.len()
    }

    /// Gives `vm` `rights` on `key` (union with what it has: both were granted). A
    /// tombstone comes back to life with what it knew.
    pub fn grant(&mut self, vm: VmIdx, key: ObjKey, rights: Rights) {
        let obj = match self.objects.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) => v.insert(match self.tombs.remove(&key) {
                Some(t) => {
                    discharge(&mut self.tombs_of, &t.ever);
                    t
                }
                None => Obj::default(),
            }),
        };
        if !obj.ever.contains(&vm) {
            obj.ever.push(vm);
        }
        match obj.holders.get_mut(&vm) {
            Some(r) => *r = *r | rights,
            None => {
                obj.holders.insert(vm, rights);
                let c = self.per_vm.entry(vm).or_insert(0);
                *c = c.saturating_add(1);
            }
        }
    }

    /// The hub delivered `key` with `rights`, less than the fd can carry: a sender without
    /// an entry later gets at most what every attenuated delivery got.
    pub fn delivered_attenuated(&mut self, key: ObjKey, rights: Rights) {
        if let Some(obj) = self.objects.get_mut(&key) {
            obj.cap = Some(obj.cap.map_or(rights, |c| c & rights));
        }
    }

    /// Does the object (live or a tombstone) have a probe?
    pub fn has_probe(&self, key: ObjKey) -> bool {
        self.objects
            .get(&key)
            .or_else(|| self.tombs.get(&key))
            .is_some_and(|o| o.probe.is_some())
    }

    /// Keeps `probe` for the (live) object `key` unless it has one.
    pub fn set_probe(&mut self, key: ObjKey, probe: OwnedFd) {
        if let Some(obj) = self.objects.get_mut(&key) {
            obj.probe.get_or_insert(probe);
        }
    }

    /// Removes `vm`'s entry on `key` (the VM says it closed its last fd to it). The last
    /// entry on an object delivered attenuated leaves a tombstone; when the tombstone
    /// table is full the entry is kept instead (returns false).
    pub fn release(&mut self, vm: VmIdx, key: ObjKey) -> bool {
        let Some(obj) = self.objects.get_mut(&key) else {
            return true;
        };
        if !obj.holders.contains_key(&vm) {
            return true;
        }
        let last = obj.holders.len() == 1;
        if last && obj.cap.is_some() {
            let full = obj
                .ever
                .iter()
                .find(|v| self.tombs_of.get(*v).copied().unwrap_or(0) >= self.tomb_budget);
            if let Some(full) = full {
                log::info!(
                    "handle table: vm {full} has {} tombstones (its budget); vm {vm} keeps its entry on {key:?}",
                    self.tomb_budget
                );
                return false;
            }
        }
        obj.holders.remove(&vm);
        self.dec(vm);
        if last {
            self.bury(key);
        }
        true
    }

    /// An object without holders: a tombstone if it was delivered attenuated and may still
    /// be open somewhere, else gone.
    fn bury(&mut self, key: ObjKey) {
        let Some(obj) = self.objects.remove(&key) else {
            return;
        };
        if obj.cap.is_some() && (obj.probe.is_some() || !obj.ever.is_empty()) {
            if self.tombs.len() >= MAX_TOMBSTONES {
                log::warn!("handle table: {MAX_TOMBSTONES} tombstones; {key:?} is forgotten");
                return;
            }
            self.charge_tomb(&obj.ever);
            self.tombs.insert(key, obj);
        }
    }

    /// Forgets every entry of `vm` (the VM went away or restarted: its fds are closed).
    pub fn forget_vm(&mut self, vm: VmIdx) {
        let mut empty = Vec::new();
        for (key, obj) in self.objects.iter_mut() {
            obj.holders.remove(&vm);
            obj.ever.retain(|v| *v != vm);
            if obj.holders.is_empty() {
                empty.push(*key);
            }
        }
        for key in empty {
            self.bury(key);
        }
        let tombs_of = &mut self.tombs_of;
        self.tombs.retain(|_, t| {
            t.ever.retain(|v| *v != vm);
            let keep = t.probe.is_some() || !t.ever.is_empty();
            if !keep {
                discharge(tombs_of, &t.ever);
            }
            keep
        });
        self.tombs_of.remove(&vm);
        self.per_vm.remove(&vm);
    }

    /// Forgets an object entirely (its last holder closed it).
    pub fn forget_object(&mut self, key: ObjKey) {
        if let Some(t) = self.tombs.remove(&key) {
            self.discharge_tomb(&t.ever);
        }
        if let Some(obj) = self.objects.remove(&key) {
            for vm in obj.holders.keys() {
                self.dec(*vm);
            }
        }
    }

    /// Asks every probe whether a description the hub passed is still open (`still_held`):
    /// if none is, nobody holds the object any more, and it goes, tombstone or live entries
    /// alike (as the memfd server releases a charge). Returns how many objects went.
    pub fn sweep_probes(&mut self, still_held: impl Fn(BorrowedFd<'_>) -> bool) -> usize {
        let before = self.tombs.len();
        let tombs_of = &mut self.tombs_of;
        self.tombs.retain(|_, t| {
            let keep = t.probe.as_ref().is_none_or(|p| still_held(p.as_fd()));
            if !keep {
                discharge(tombs_of, &t.ever);
            }
            keep
        });
        let mut gone = before - self.tombs.len();
        let closed: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, o)| o.probe.as_ref().is_some_and(|p| !still_held(p.as_fd())))
            .map(|(k, _)| *k)
            .collect();
        for key in closed {
            self.forget_object(key);
            gone += 1;
        }
        gone
    }

    fn dec(&mut self, vm: VmIdx) {
        if let Some(c) = self.per_vm.get_mut(&vm) {
            *c = c.saturating_sub(1);
        }
    }
}

/// Takes one tombstone's charge off each VM of `ever`.
fn discharge(tombs_of: &mut FastMap<VmIdx, usize>, ever: &[VmIdx]) {
    for vm in ever {
        if let Some(n) = tombs_of.get_mut(vm) {
            *n = n.saturating_sub(1);
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

    #[test]
    fn attenuated_objects_leave_tombstones_until_their_holders_are_gone() {
        let k = ObjKey { dev: 1, ino: 3 };
        let ro = Rights::READ | Rights::MAP;
        let mut h = Handles::default();
        h.grant(0, k, Rights::ALL);
        h.grant(1, k, ro | Rights::TRANSFER);
        h.delivered_attenuated(k, ro | Rights::TRANSFER);
        h.grant(2, k, ro);
        h.delivered_attenuated(k, ro);
        for vm in [0, 1, 2] {
            assert!(h.release(vm, k));
        }
        assert_eq!(h.tombstones(), 1);
        // Whoever sends it next gets what every attenuated delivery got, at most.
        assert_eq!(h.rights_of(1, k, Rights::ALL), Some(ro));
        h.grant(1, k, ro);
        assert_eq!(h.tombstones(), 0);
        assert!(h.release(1, k));
        assert_eq!(h.tombstones(), 1);
        // Without a probe it lasts until every VM that held it went away.
        h.forget_vm(0);
        h.forget_vm(1);
        assert_eq!(h.tombstones(), 1);
        h.forget_vm(2);
        assert_eq!(h.tombstones(), 0);
        assert_eq!(h.rights_of(1, k, Rights::ALL), Some(Rights::ALL));
        // Never delivered attenuated: forgotten with its last entry.
        h.grant(0, k, Rights::ALL);
        h.release(0, k);
        assert_eq!(h.tombstones(), 0);
        // A forgotten object (memfd server: last holder closed) leaves nothing.
        h.grant(0, k, Rights::ALL);
        h.grant(1, k, ro);
        h.delivered_attenuated(k, ro);
        h.release(1, k);
        h.forget_object(k);
        assert_eq!((h.tombstones(), h.count(0)), (0, 0));
    }

    #[test]
    fn tombstones_are_charged_to_their_holders_and_bounded_per_vm() {
        let ro = Rights::READ | Rights::MAP;
        let mut h = Handles::new(2);
        let tomb = |h: &mut Handles, ino: u64, a: VmIdx, b: VmIdx| {
            let k = ObjKey { dev: 1, ino };
            h.grant(a, k, Rights::ALL);
            h.grant(b, k, ro);
            h.delivered_attenuated(k, ro);
            let first = h.release(b, k);
            (first, h.release(a, k))
        };
        assert_eq!(tomb(&mut h, 1, 0, 1), (true, true));
        assert_eq!(tomb(&mut h, 2, 0, 1), (true, true));
        assert_eq!((h.tombstones_of(0), h.tombstones_of(1)), (2, 2));
        // A third would go past vm 0's (and 1's) budget: the last release is not honoured.
        assert_eq!(tomb(&mut h, 3, 0, 1), (true, false));
        assert_eq!(h.tombstones(), 2);
        // Other VMs are not affected.
        assert_eq!(tomb(&mut h, 4, 2, 3), (true, true));
        assert_eq!(h.tombstones_of(2), 1);
        // A VM that goes away takes its charges with it.
        h.forget_vm(1);
        assert_eq!(h.tombstones_of(1), 0);
        assert_eq!(h.tombstones_of(0), 2);
        h.forget_vm(0);
        assert_eq!(h.tombstones_of(0), 0);
    }
}
