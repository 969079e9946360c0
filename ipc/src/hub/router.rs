//! The per-frame transfer check, in the order of policy.md's "Transfer check".
//!
//! For every fd of a frame, with the sender's requested rights:
//! 1. the hub's own classification succeeded, the object is not twice in the frame, it is
//!    not one of the connection's own sockets (`v ≠ c`: a connection carried inside itself)
//!    nor any other hub connection's (connections are made by `connect` grants, never
//!    passed on), and the sender holds an entry on it (or nobody does: it is the origin) —
//!    else `InvalidId`;
//! 2. the sender's rights include TRANSFER — else `PermissionDenied`;
//! 3. requested ⊆ the sender's rights — else `InvalidArgs` (strict, no silent clamp);
//! 4. the type is in the connection's caps for the direction — else `PermissionDenied`;
//! 5. final = requested ∩ caps (TRANSFER dropped unless the caps grant it);
//!
//! then for the frame: 6. the count is within `max-fds` and the receiver's `vfds` quota
//! holds. The first failure rejects the whole frame; nothing has been changed by then
//! (the caller commits only an `Ok`).

use bulkhead_policy::{ConnectionCaps, Direction, Policy, Rights};

use crate::classify::{Classified, ClassifyError, FdKind, ObjKey};
use crate::hub::handles::{FastMap, Handles, VmIdx};
use crate::hub::protocol::{ConnId, Refusal};

/// One fd as it arrived: the hub's classification and the rights the sender asked for.
#[derive(Debug, Clone)]
pub struct FdIn {
    /// Classification of the received fd.
    pub class: Result<Classified, ClassifyError>,
    /// Requested rights.
    pub requested: Rights,
}

/// One approved fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approved {
    /// What it is.
    pub class: Classified,
    /// The sender's rights on it (its entry, or origin rights).
    pub sender_rights: Rights,
    /// The receiver's rights.
    pub rights: Rights,
}

/// A rejected frame: the uniform error for the sender and the detail for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What the sender is told.
    pub refusal: Refusal,
    /// Why (host only).
    pub reason: String,
    /// Deciding rules.
    pub rules: Vec<String>,
}

fn reject(refusal: Refusal, reason: String) -> Rejection {
    Rejection {
        refusal,
        reason,
        rules: Vec::new(),
    }
}

/// Who is sending to whom on which connection.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The connection's caps under the deciding generation.
    pub caps: &'a ConnectionCaps,
    /// Direction of this frame.
    pub dir: Direction,
    /// Sending VM.
    pub sender: VmIdx,
    /// Receiving VM.
    pub receiver: VmIdx,
    /// The receiver's `vfds` quota.
    pub receiver_vfds: u64,
    /// The sender's `vfds` quota (objects it sends for the first time become its entries).
    pub sender_vfds: u64,
    /// The connection's own sockets (its VMM-side ends): never carried over it.
    pub conn_ends: &'a [ObjKey],
    /// The VMM-side ends of every hub connection (mediated sockets included): never
    /// carried anywhere.
    pub hub_ends: &'a FastMap<ObjKey, ConnId>,
}

/// Checks a whole frame; `Ok` lists the final rights per fd, in order.
pub fn check_frame(
    policy: &Policy,
    hop: Hop<'_>,
    handles: &Handles,
    fds: &[FdIn],
) -> Result<Vec<Approved>, Rejection> {
    let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    let mut seen: Vec<ObjKey> = Vec::with_capacity(fds.len());
    let mut out = Vec::with_capacity(fds.len());
    let mut new_entries: u64 = 0;
    let mut new_origins: u64 = 0;
    for (i, fd) in fds.iter().enumerate() {
        // 1. ids
        let class = match &fd.class {
            Ok(c) => *c,
            Err(e @ ClassifyError::Sys { .. }) => {
                return Err(reject(Refusal::InvalidId, format!("fd {i}: {e}")))
            }
            Err(e) => {
                return Err(reject(
                    Refusal::PermissionDenied,
                    format!("fd {i}: type not passable: {e}"),
                ))
            }
        };
        if seen.contains(&class.key) {
            return Err(reject(
                Refusal::InvalidId,
                format!("fd {i}: the same object twice in one frame"),
            ));
        }
        seen.push(class.key);
        if hop.conn_ends.contains(&class.key) {
            return Err(reject(
                Refusal::InvalidId,
                format!("fd {i}: the connection's own socket, sent over the connection"),
            ));
        }
        if let Some(other) = hop.hub_ends.get(&class.key) {
            return Err(reject(
                Refusal::InvalidId,
                format!(
                    "fd {i}: the socket of hub connection {other} (connections come from connect grants, never from another VM)"
                ),
            ));
        }
        let Some(sender_rights) = handles.rights_of(hop.sender, class.key, class.max_rights) else {
            return Err(reject(
                Refusal::InvalidId,
                format!("fd {i}: sender holds no right on this {:?}", class.kind),
            ));
        };
        // 2. TRANSFER
        if !sender_rights.contains(Rights::TRANSFER) {
            return Err(reject(
                Refusal::PermissionDenied,
                format!("fd {i}: sender's rights {sender_rights} lack transfer"),
            ));
        }
        // 3. subset
        if !fd.requested.is_subset_of(sender_rights) {
            return Err(reject(
                Refusal::InvalidArgs,
                format!(
                    "fd {i}: requested {} exceeds the sender's {sender_rights}",
                    fd.requested
                ),
            ));
        }
        // 4, 5 (and 6's max-fds): the policy.
        let d = policy.check_transfer(hop.caps, hop.dir, class.fd_type(), fd.requested, count);
        let rights = match d.outcome {
            Ok(r) => r,
            Err(den) => {
                return Err(Rejection {
                    refusal: den.kind.guest_error().into(),
                    reason: format!("fd {i}: {}", den.reason),
                    rules: d.rules.iter().map(|r| r.to_string()).collect(),
                })
            }
        };
        debug_assert!(rights.is_subset_of(sender_rights));
        if !handles.holds(hop.receiver, class.key) {
            new_entries = new_entries.saturating_add(1);
        }
        if !handles.holds(hop.sender, class.key) {
            new_origins = new_origins.saturating_add(1);
        }
        out.push(Approved {
            class,
            sender_rights,
            rights,
        });
    }
    // 6. the receiver's vfds quota (max-fds was checked per fd by check_transfer).
    let total = handles.count(hop.receiver).saturating_add(new_entries);
    if new_entries > 0 && total > hop.receiver_vfds {
        return Err(reject(
            Refusal::OutOfMemory,
            format!(
                "receiver's vfds quota {} would be exceeded ({total})",
                hop.receiver_vfds
            ),
        ));
    }
    let origins = handles.count(hop.sender).saturating_add(new_origins);
    if new_origins > 0 && origins > hop.sender_vfds {
        return Err(reject(
            Refusal::OutOfMemory,
            format!(
                "sender's vfds quota {} would be exceeded by new objects ({origins})",
                hop.sender_vfds
            ),
        ));
    }
    Ok(out)
}

/// Records an approved frame in the handle table: the origin's entry if new, the
/// receiver's rights (and, when they are less than the fd can carry, the attenuation, for a
/// tombstone), and a move (no DUP) removes the sender's entry.
pub fn commit(handles: &mut Handles, hop: Hop<'_>, approved: &[Approved]) {
    for a in approved {
        if !handles.holds(hop.sender, a.class.key) {
            handles.grant(hop.sender, a.class.key, a.sender_rights);
        }
        handles.grant(hop.receiver, a.class.key, a.rights);
        if !a.rights.contains(a.class.max_rights) {
            handles.delivered_attenuated(a.class.key, a.rights);
        }
        if !a.sender_rights.contains(Rights::DUP) && hop.sender != hop.receiver {
            handles.release(hop.sender, a.class.key);
        }
    }
}

/// `memfd:read+map`-style text for the audit log.
pub fn describe(kind: FdKind, rights: Rights) -> String {
    format!("{}:{rights}", kind.fd_type())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_policy::{FdCaps, FdType};
    use proptest::prelude::*;

    fn caps(c2s: Rights, max_fds: u32) -> ConnectionCaps {
        let mut c = FdCaps::NONE;
        c.set(FdType::Memfd, c2s);
        ConnectionCaps {
            provider: "p".into(),
            c2s: c,
            s2c: FdCaps::NONE,
            max_fds,
            max_conns: None,
            rules: Vec::new(),
        }
    }

    fn memfd_class(key: ObjKey) -> Classified {
        Classified {
            kind: FdKind::Memfd,
            key,
            max_rights: Rights::READ | Rights::WRITE | Rights::MAP | Rights::TRANSFER | Rights::DUP,
            size: 4096,
        }
    }

    fn memfd_rights() -> impl Strategy<Value = Rights> {
        (0u32..32).prop_map(|b| {
            let all = [
                Rights::READ,
                Rights::WRITE,
                Rights::MAP,
                Rights::TRANSFER,
                Rights::DUP,
            ];
            all.iter()
                .enumerate()
                .filter(|(i, _)| b & (1 << i) != 0)
                .fold(Rights::NONE, |acc, (_, r)| acc | *r)
        })
    }

    proptest! {
        /// Along any chain of hops with any caps and any requests, a VM's rights are a subset
        /// of the previous holder's rights ∩ the hop's caps, and TRANSFER survives only when
        /// the caps grant it.
        #[test]
        fn rights_never_grow_across_hops(
            hops in proptest::collection::vec((memfd_rights(), memfd_rights()), 1..8)
        ) {
            let policy = Policy::deny_all();
            let key = ObjKey { dev: 1, ino: 42 };
            let mut handles = Handles::default();
            let class = memfd_class(key);
            for (i, (cap, req)) in hops.iter().enumerate() {
                let (sender, receiver) = (i, i + 1);
                let c = caps(*cap, 28);
                let ends = FastMap::default();
                let hop = Hop { caps: &c, dir: Direction::C2s, sender, receiver, receiver_vfds: 100, sender_vfds: 100, conn_ends: &[], hub_ends: &ends };
                let before = handles.rights_of(sender, key, class.max_rights);
                let fds = [FdIn { class: Ok(class), requested: *req }];
                match check_frame(&policy, hop, &handles, &fds) {
                    Ok(approved) => {
                        let held = before.unwrap_or(Rights::NONE);
                        commit(&mut handles, hop, &approved);
                        let got = handles.rights_of(receiver, key, Rights::NONE).unwrap_or(Rights::NONE);
                        prop_assert!(got.is_subset_of(held & *cap));
                        prop_assert!(got.is_subset_of(*req));
                        prop_assert!(held.contains(Rights::TRANSFER));
                        prop_assert!(!got.contains(Rights::TRANSFER) || cap.contains(Rights::TRANSFER));
                    }
                    Err(rej) => {
                        if let Some(held) = before {
                            if !held.contains(Rights::TRANSFER) {
                                prop_assert_eq!(rej.refusal, Refusal::PermissionDenied);
                            } else if !req.is_subset_of(held) {
                                prop_assert_eq!(rej.refusal, Refusal::InvalidArgs);
                            }
                        }
                        break;
                    }
                }
            }
        }
    }

    #[test]
    fn too_many_fds_and_vfds_quota() {
        let policy = Policy::deny_all();
        let handles = Handles::default();
        let c = caps(Rights::READ | Rights::MAP, 2);
        let ends = FastMap::default();
        let hop = Hop {
            caps: &c,
            dir: Direction::C2s,
            sender: 0,
            receiver: 1,
            receiver_vfds: 2,
            sender_vfds: 100,
            conn_ends: &[],
            hub_ends: &ends,
        };
        let fds: Vec<FdIn> = (0..3)
            .map(|i| FdIn {
                class: Ok(memfd_class(ObjKey { dev: 1, ino: i })),
                requested: Rights::READ,
            })
            .collect();
        assert_eq!(
            check_frame(&policy, hop, &handles, &fds)
                .unwrap_err()
                .refusal,
            Refusal::InvalidArgs
        );
        let hop = Hop {
            receiver_vfds: 1,
            ..hop
        };
        assert_eq!(
            check_frame(&policy, hop, &handles, &fds[..2])
                .unwrap_err()
                .refusal,
            Refusal::OutOfMemory
        );
        assert!(check_frame(&policy, hop, &handles, &fds[..1]).is_ok());
    }
}
