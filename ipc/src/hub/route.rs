//! One frame on a connection: decode it, classify its fds, check it under one policy
//! generation (`router::check_frame`), and either refuse it whole (`deny_frame`: one
//! refusal, one audit record, every fd closed) or commit it and queue the delivery.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bulkhead_policy::ConnectionCaps;

use crate::classify::{classify, FdKind};
use crate::frame;

use super::audit::Entry;
use super::conn::ConnDecision;
use super::conn::{dir_from, other, Side};
use super::protocol::{ConnEvent, ConnId, ConnSend, FdInfo, Refusal};
use super::router::{self, FdIn, Hop};
use super::Hub;

/// What [`Hub::decide`] found.
pub(super) struct Decision {
    /// The connection's standing under the deciding generation, if it was not cached yet.
    pub(super) standing: Option<ConnDecision>,
    /// Deliver as planned, or refuse.
    pub(super) verdict: Result<Plan, Denial>,
}

/// An approved frame, ready to commit.
pub(super) struct Plan {
    seq: u32,
    data: Vec<u8>,
    caps: Arc<ConnectionCaps>,
    receiver_vfds: u64,
    sender_vfds: u64,
    approved: Vec<router::Approved>,
}

/// A refused frame: the uniform answer for the sender and the detail for the audit log.
pub(super) struct Denial {
    seq: u32,
    refusal: Refusal,
    reason: String,
    rules: Vec<String>,
    fds: Vec<String>,
}

impl Denial {
    fn new(seq: u32, refusal: Refusal, reason: String) -> Denial {
        Denial {
            seq,
            refusal,
            reason,
            rules: Vec::new(),
            fds: Vec::new(),
        }
    }
}

impl Hub {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn deny_frame(
        &mut self,
        id: ConnId,
        s: Side,
        seq: u32,
        refusal: Refusal,
        reason: String,
        rules: Vec<String>,
        fds: Vec<String>,
    ) {
        let generation = self.store.current().number;
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (src, dst) = (c.end(s).vm, c.end(other(s)).vm);
        let obj = format!(
            "{}@{} conn {id} {} → {}",
            c.service,
            self.vm_name(c.provider.vm),
            dir_from(s),
            self.vm_name(dst)
        );
        self.audit.record(Entry {
            generation,
            rules,
            src: self.vm_name(src),
            verb: "transfer",
            obj,
            fds,
            allowed: false,
            reason: Some(reason),
            similar: 0,
        });
        self.queue_conn(
            id,
            s,
            &ConnEvent::Refused {
                seq,
                error: refusal,
            },
            Vec::new(),
        );
    }

    /// One frame from side `s` of connection `id`: [`Hub::decide`] (which changes nothing),
    /// then [`Hub::commit`] or [`Hub::deny_frame`].
    pub(super) fn route(&mut self, id: ConnId, s: Side, bytes: Vec<u8>, fds: Vec<OwnedFd>) {
        let d = self.decide(id, s, &bytes, &fds);
        if let Some(standing) = d.standing {
            if let Some(c) = self.conns.get_mut(&id) {
                c.caps = Some(standing);
            }
        }
        match d.verdict {
            Ok(plan) => self.commit(id, s, plan, fds),
            Err(denial) => {
                drop(fds);
                self.deny_frame(
                    id,
                    s,
                    denial.seq,
                    denial.refusal,
                    denial.reason,
                    denial.rules,
                    denial.fds,
                );
            }
        }
    }

    /// The decision on one frame, under one policy generation. Pure: it reads the hub's
    /// state and changes nothing (a connection's standing under a new generation is returned
    /// for the caller to cache).
    pub(super) fn decide(&self, id: ConnId, s: Side, bytes: &[u8], fds: &[OwnedFd]) -> Decision {
        let mut d = Decision {
            standing: None,
            verdict: Err(Denial::new(0, Refusal::InvalidArgs, String::new())),
        };
        let msg: ConnSend = match frame::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                d.verdict = Err(Denial::new(
                    0,
                    Refusal::InvalidArgs,
                    format!("bad frame: {e}"),
                ));
                return d;
            }
        };
        if msg.rights.len() != fds.len() {
            let reason = format!(
                "{} fds attached, {} rights given",
                fds.len(),
                msg.rights.len()
            );
            d.verdict = Err(Denial::new(msg.seq, Refusal::InvalidArgs, reason));
            return d;
        }
        // One generation for the whole decision.
        let gen = self.store.current();
        let Some(standing) = self.standing(id, &gen) else {
            d.verdict = Err(Denial::new(
                msg.seq,
                Refusal::InvalidId,
                "no connection".into(),
            ));
            return d;
        };
        let cached = self
            .conns
            .get(&id)
            .and_then(|c| c.caps.as_ref())
            .is_some_and(|c| c.generation == standing.generation);
        if !cached {
            d.standing = Some(standing.clone());
        }
        let Some(caps) = standing.caps.clone() else {
            let reason = format!("generation {} no longer allows this connection", gen.number);
            d.verdict = Err(Denial::new(msg.seq, Refusal::PermissionDenied, reason));
            return d;
        };
        let Some(c) = self.conns.get(&id) else {
            d.verdict = Err(Denial::new(
                msg.seq,
                Refusal::InvalidId,
                "no connection".into(),
            ));
            return d;
        };
        let (sender, receiver) = (c.end(s).vm, c.end(other(s)).vm);
        let [client_vfds, provider_vfds] = standing.vfds;
        let (sender_vfds, receiver_vfds) = match s {
            Side::Client => (client_vfds, provider_vfds),
            Side::Provider => (provider_vfds, client_vfds),
        };
        let ins: Vec<FdIn> = fds
            .iter()
            .zip(msg.rights.iter())
            .map(|(fd, r)| FdIn {
                class: classify(fd.as_fd()),
                requested: *r,
            })
            .collect();
        let hop = Hop {
            caps: &caps,
            dir: dir_from(s),
            sender,
            receiver,
            receiver_vfds,
            sender_vfds,
            conn_ends: &c.vmm_ends,
        };
        d.verdict = match router::check_frame(&gen.policy, hop, &self.handles, &ins) {
            Err(rej) => {
                let described: Vec<String> = ins
                    .iter()
                    .map(|f| match &f.class {
                        Ok(c) => router::describe(c.kind, f.requested),
                        Err(e) => format!("unclassifiable({e}):{}", f.requested),
                    })
                    .collect();
                Err(Denial {
                    seq: msg.seq,
                    refusal: rej.refusal,
                    reason: rej.reason,
                    rules: rej.rules,
                    fds: described,
                })
            }
            Ok(approved) => Ok(Plan {
                seq: msg.seq,
                data: msg.data,
                caps,
                receiver_vfds,
                sender_vfds,
                approved,
            }),
        };
        d
    }

    /// Carries out an approved frame: kernel-level attenuation first (it can fail, and then
    /// the frame is refused with nothing changed), then the handle table, then the delivery.
    pub(super) fn commit(&mut self, id: ConnId, s: Side, plan: Plan, fds: Vec<OwnedFd>) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (sender, receiver) = (c.end(s).vm, c.end(other(s)).vm);
        let vmm_ends = c.vmm_ends;
        let probes = self.track_attenuated(&plan.approved, &fds);
        let fds = match self.attenuate_memfds(&plan.approved, fds) {
            Ok(fds) => fds,
            Err(reason) => {
                return self.deny_frame(
                    id,
                    s,
                    plan.seq,
                    Refusal::OutOfMemory,
                    reason,
                    Vec::new(),
                    Vec::new(),
                )
            }
        };
        let hop = Hop {
            caps: &plan.caps,
            dir: dir_from(s),
            sender,
            receiver,
            receiver_vfds: plan.receiver_vfds,
            sender_vfds: plan.sender_vfds,
            conn_ends: &vmm_ends,
        };
        router::commit(&mut self.handles, hop, &plan.approved);
        for (key, probe) in probes {
            self.handles.set_probe(key, probe);
        }
        let mut infos = heapless::Vec::new();
        for a in &plan.approved {
            let info = FdInfo {
                fd_type: a.class.fd_type(),
                write_end: a.class.kind == FdKind::PipeWrite,
                rights: a.rights,
            };
            if infos.push(info).is_err() {
                break; // cannot happen: at most MAX_FDS arrived
            }
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.allowed_frames = c.allowed_frames.saturating_add(1);
        }
        let ev = ConnEvent::Deliver {
            data: plan.data,
            fds: infos,
        };
        self.queue_conn(id, other(s), &ev, fds);
    }
}
