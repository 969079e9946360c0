//! The evaluation indexes: one flat hash map per rule kind keyed by subject and object, so
//! a check costs one probe per level (@any, each group, the VM) whatever the number of rules.

use std::collections::HashMap;

use super::decision::{is_system_vm, RuleRef};
use crate::ast::Subject;
use crate::rights::FdCaps;
/// FNV-1a: a fast hasher for the evaluation indexes. Hash flooding is not a concern: the
/// maps' keys come from the (trusted) policy files; a guest-chosen service name only probes.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `HashMap` with [`Fnv`].
pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Longest index key: tag, subject, NUL, object.
const KEY_MAX: usize = 2 + 2 * crate::parse::MAX_NAME_LEN;

/// Write the index key `tag subject NUL object` into `buf`; None if it cannot be a key (too
/// long: names are at most 64 bytes, so no such entry exists).
fn index_key<'b>(
    buf: &'b mut [u8; KEY_MAX],
    tag: u8,
    subject: &str,
    object: &str,
) -> Option<&'b str> {
    let n = 2 + subject.len() + object.len();
    if n > KEY_MAX {
        return None;
    }
    let (head, rest) = buf.split_first_mut()?;
    *head = tag;
    let (subj, rest) = rest.split_at_mut(subject.len());
    subj.copy_from_slice(subject.as_bytes());
    let (nul, rest) = rest.split_first_mut()?;
    *nul = 0;
    rest.get_mut(..object.len())?
        .copy_from_slice(object.as_bytes());
    std::str::from_utf8(buf.get(..n)?).ok()
}

/// Per-subject index: (subject, object) → entries, one flat map keyed by
/// `tag subject NUL object` (tag `v` VM, `g` group, `a` @any), so a lookup is one probe.
#[derive(Clone, Debug, Default)]
pub(crate) struct SubjectIndex<T> {
    map: FastMap<String, Vec<T>>,
}

impl<T> SubjectIndex<T> {
    pub fn new() -> Self {
        SubjectIndex {
            map: FastMap::default(),
        }
    }

    pub fn insert(&mut self, subject: &Subject, object: &str, v: T) {
        let (tag, name) = match subject {
            Subject::Vm(n) => ('v', n.as_str()),
            Subject::Group(g) => ('g', g.as_str()),
            Subject::Any => ('a', ""),
        };
        self.map
            .entry(format!("{tag}{name}\0{object}"))
            .or_default()
            .push(v);
    }

    fn get(&self, tag: u8, subject: &str, object: &str) -> &[T] {
        let mut buf = [0u8; KEY_MAX];
        index_key(&mut buf, tag, subject, object)
            .and_then(|k| self.map.get(k))
            .map_or(&[], |v| v.as_slice())
    }

    /// Entries for `object` whose subject is `vm` by name.
    pub fn at_vm(&self, vm: &str, object: &str) -> &[T] {
        self.get(b'v', vm, object)
    }

    /// Entries for `object` whose subject is one of `groups`.
    pub fn at_groups<'a>(
        &'a self,
        groups: &'a [String],
        object: &'a str,
    ) -> impl Iterator<Item = &'a T> + 'a {
        groups
            .iter()
            .flat_map(move |g| self.get(b'g', g, object).iter())
    }

    /// Entries for `object` whose subject is `@any` (none for system VMs).
    pub fn at_any(&self, vm: &str, object: &str) -> &[T] {
        if is_system_vm(vm) {
            return &[];
        }
        self.get(b'a', "", object)
    }

    /// Entries for `object` that apply to `vm`, by level: (@any, groups, VM).
    pub fn lookup<'a>(
        &'a self,
        vm: &str,
        groups: &'a [String],
        object: &'a str,
    ) -> [Vec<&'a T>; 3] {
        [
            self.at_any(vm, object).iter().collect(),
            self.at_groups(groups, object).collect(),
            self.at_vm(vm, object).iter().collect(),
        ]
    }
}

/// A connect grant with its caps already narrowed against the contract.
#[derive(Clone, Debug)]
pub(crate) struct ConnectGrant {
    pub at: RuleRef,
    pub c2s: FdCaps,
    pub s2c: FdCaps,
}

/// One entry of the connect index: a grant or a deny for (subject, service).
#[derive(Clone, Debug)]
pub(crate) enum ConnectItem {
    Grant(ConnectGrant),
    Deny {
        at: RuleRef,
        /// The `@PROVIDER` of the deny, if written.
        provider: Option<String>,
    },
}
