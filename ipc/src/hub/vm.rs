//! VM channels: a VM's requests (provide, connect, close, shared memory, release, hello),
//! the events queued toward its VMM, and what the hub forgets when a VM goes away.
//!
//! The event queue toward a VMM is bounded (`Budgets::events`) and nothing in it is ever
//! dropped: answers to the VM's own requests fit because the hub reads no more requests
//! than there is room for answers; an `Accept` for a VM whose queue is full is not made
//! (the client's `Connect` is refused `Busy`); and `Closed` notices wait in a set (one per
//! connection at most) until there is room.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::OwnedFd;

use crate::channel::{Channel, ChannelError};
use crate::classify::ObjKey;
use crate::frame;

use super::audit::Entry;
use super::budget::Usage;
use super::handles::VmIdx;
use super::memfd_server;
use super::protocol::{ConnId, HubEvent, Refusal, VmRequest};
use super::queue::{flush_frames, own_all, Out};
use super::Hub;

pub(super) struct VmSlot {
    pub(super) name: String,
    pub(super) chan: Option<Channel>,
    /// Events for its VMM not yet sent.
    pub(super) out: VecDeque<Out>,
    /// Connections closed (by the peer, or the hub) whose `Closed` notice waits for room.
    pub(super) closed: BTreeSet<ConnId>,
    /// What the hub spends on this VM (`budget.rs`).
    pub(super) usage: Usage,
}

impl VmSlot {
    pub(super) fn new(name: String, chan: Channel) -> VmSlot {
        VmSlot {
            name,
            chan: Some(chan),
            out: VecDeque::new(),
            closed: BTreeSet::new(),
            usage: Usage::default(),
        }
    }
}

impl Hub {
    /// Reads the VM's requests, no more than its event queue has room to answer.
    pub(super) fn read_vm(&mut self, vm: VmIdx) {
        for _ in 0..64 {
            if !self.events_room(vm) {
                return;
            }
            let Some(ch) = self.vms.get(vm).and_then(|v| v.chan.as_ref()) else {
                return;
            };
            match ch.try_recv::<VmRequest>() {
                Ok((req, fds)) => {
                    drop(fds); // requests carry no fds; any attached are closed
                    self.vm_request(vm, req);
                }
                Err(ChannelError::WouldBlock) => return,
                Err(ChannelError::Closed) => {
                    self.vm_gone(vm);
                    return;
                }
                Err(ChannelError::Sys { errno, .. }) => {
                    log::warn!(
                        "vm {}: channel error {errno}; dropping it",
                        self.vm_name(vm)
                    );
                    self.vm_gone(vm);
                    return;
                }
                Err(e) => {
                    // Bad frame: consumed and its fds closed by the channel; tell the VMM.
                    log::warn!("vm {}: bad request: {e}", self.vm_name(vm));
                    self.audit_simple(vm, "request", String::new(), Some(e.to_string()));
                    self.send_vm(
                        vm,
                        &HubEvent::Refused {
                            tag: 0,
                            error: Refusal::InvalidArgs,
                        },
                        Vec::new(),
                    );
                }
            }
        }
    }

    pub(super) fn vm_name(&self, vm: VmIdx) -> String {
        self.vms.get(vm).map(|v| v.name.clone()).unwrap_or_default()
    }

    pub(super) fn vm_gone(&mut self, vm: VmIdx) {
        log::info!("vm {} closed its channel", self.vm_name(vm));
        if let Some(slot) = self.vms.get_mut(vm) {
            slot.chan = None;
            slot.out.clear();
            slot.closed.clear();
        }
        self.forget_vm_state(vm);
    }

    /// A VM starts again with nothing: its services, connections and handle-table entries go
    /// (its channel, if open, stays).
    pub(super) fn forget_vm_state(&mut self, vm: VmIdx) {
        self.registry.forget_vm(vm);
        self.handles.forget_vm(vm);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.client.vm == vm || c.provider.vm == vm)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close_conn(id, 0);
        }
        let meds: Vec<ConnId> = self
            .meds
            .iter()
            .filter(|(_, m)| m.end.vm == vm || m.owner == vm)
            .map(|(id, _)| *id)
            .collect();
        for id in meds {
            self.close_med(id);
        }
        self.sweep_memfds();
    }

    /// Is there room for one more event toward `vm`?
    pub(super) fn events_room(&self, vm: VmIdx) -> bool {
        self.vms
            .get(vm)
            .is_some_and(|s| s.out.len() + s.closed.len() < self.budgets.events)
    }

    /// Tells `vm` that connection `conn` closed (queued as a notice, never dropped).
    pub(super) fn notify_closed(&mut self, vm: VmIdx, conn: ConnId) {
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        if slot.chan.is_none() {
            return;
        }
        slot.closed.insert(conn);
        self.flush_vm(vm);
    }

    pub(super) fn send_vm(&mut self, vm: VmIdx, ev: &HubEvent, fds: Vec<OwnedFd>) {
        let bytes = match frame::encode(ev) {
            Ok(b) => b,
            Err(e) => {
                log::error!("cannot encode {ev:?}: {e}");
                return;
            }
        };
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        if slot.chan.is_none() {
            return;
        }
        // Answers to the VM's own requests always fit (read_vm reads no more than there
        // is room for), and Accepts are only made with room (`connect`).
        slot.out.push_back(Out {
            bytes,
            fds: own_all(fds),
        });
        self.flush_vm(vm);
    }

    /// Sends what waits toward `vm`: `Closed` notices join the queue as room allows.
    pub(super) fn flush_vm(&mut self, vm: VmIdx) {
        let limit = self.budgets.events;
        let Some(slot) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(ch) = &slot.chan else {
            return;
        };
        loop {
            while slot.out.len() < limit {
                let Some(conn) = slot.closed.pop_first() else {
                    break;
                };
                match frame::encode(&HubEvent::Closed { tag: 0, conn }) {
                    Ok(bytes) => slot.out.push_back(Out {
                        bytes,
                        fds: Vec::new(),
                    }),
                    Err(e) => log::error!("cannot encode Closed: {e}"),
                }
            }
            let before = slot.out.len();
            match flush_frames(ch, &mut slot.out) {
                Ok(()) | Err(ChannelError::Closed) => {}
                Err(e) => log::warn!("vm {}: send failed: {e}", slot.name),
            }
            if slot.closed.is_empty() || slot.out.len() == before {
                return;
            }
        }
    }

    pub(super) fn vm_request(&mut self, vm: VmIdx, req: VmRequest) {
        match req {
            VmRequest::Provide { tag, service } => self.provide(vm, tag, &service),
            VmRequest::Connect {
                tag,
                service,
                provider,
            } => self.connect(vm, tag, &service, provider.as_deref()),
            VmRequest::Close { tag, conn } => {
                let party = self
                    .conns
                    .get(&conn)
                    .is_some_and(|c| c.client.vm == vm || c.provider.vm == vm);
                if party {
                    self.close_conn(conn, tag);
                } else {
                    self.audit_simple(
                        vm,
                        "close",
                        format!("conn {conn}"),
                        Some("not a connection of this VM".into()),
                    );
                    self.refuse_vm(vm, tag, Refusal::InvalidId);
                }
            }
            VmRequest::AllocShm { tag, size } => self.alloc_shm(vm, tag, size),
            VmRequest::Release { dev, ino } => {
                self.handles.release(vm, ObjKey { dev, ino });
            }
            VmRequest::Hello => {
                log::info!(
                    "vm {}: VMM (re)started; its earlier state is forgotten",
                    self.vm_name(vm)
                );
                if let Some(slot) = self.vms.get_mut(vm) {
                    slot.out.clear();
                    slot.closed.clear();
                }
                self.forget_vm_state(vm);
            }
        }
    }

    pub(super) fn refuse_vm(&mut self, vm: VmIdx, tag: u32, error: Refusal) {
        self.send_vm(vm, &HubEvent::Refused { tag, error }, Vec::new());
    }

    pub(super) fn audit_simple(
        &mut self,
        vm: VmIdx,
        verb: &'static str,
        obj: String,
        reason: Option<String>,
    ) {
        let generation = self.store.current().number;
        let allowed = reason.is_none();
        self.audit.record(Entry {
            generation,
            src: self.vm_name(vm),
            verb,
            obj,
            allowed,
            reason,
            ..Entry::default()
        });
    }

    pub(super) fn provide(&mut self, vm: VmIdx, tag: u32, service: &str) {
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let d = gen.policy.check_provide(&name, service);
        let rules: Vec<String> = d.rules.iter().map(|r| r.to_string()).collect();
        let reason = match d.outcome {
            Err(den) => Some(den.reason.to_string()),
            Ok(_) => match self.registry.provide(service, vm) {
                Ok(()) => None,
                Err(other) => Some(format!(
                    "{service} is already provided by running vm {}",
                    self.vm_name(other)
                )),
            },
        };
        let allowed = reason.is_none();
        self.audit.record(Entry {
            generation: gen.number,
            rules,
            src: name,
            verb: "provide",
            obj: service.to_string(),
            allowed,
            reason,
            ..Entry::default()
        });
        if allowed {
            self.send_vm(vm, &HubEvent::Provided { tag }, Vec::new());
        } else {
            self.refuse_vm(vm, tag, Refusal::PermissionDenied);
        }
    }

    pub(super) fn alloc_shm(&mut self, vm: VmIdx, tag: u32, size: u64) {
        self.sweep_memfds();
        let gen = self.store.current();
        let name = self.vm_name(vm);
        let quota = gen.policy.quota_for(&name);
        match self.memfd.alloc(vm, size, &quota) {
            Ok((fd, bytes, key)) => {
                let all = bulkhead_policy::Rights::READ
                    | bulkhead_policy::Rights::WRITE
                    | bulkhead_policy::Rights::MAP
                    | bulkhead_policy::Rights::TRANSFER
                    | bulkhead_policy::Rights::DUP;
                self.handles.grant(vm, key, all);
                self.send_vm(vm, &HubEvent::ShmAllocated { tag, size: bytes }, vec![fd]);
            }
            Err(e) => {
                let refusal = match e {
                    memfd_server::ShmError::Quota { .. } => Refusal::OutOfMemory,
                    memfd_server::ShmError::Sys { .. } => Refusal::OutOfMemory,
                    _ => Refusal::InvalidArgs,
                };
                let mut rules: Vec<String> =
                    [quota.shm.from.as_ref(), quota.shm_count.from.as_ref()]
                        .into_iter()
                        .flatten()
                        .map(|r| r.to_string())
                        .collect();
                rules.dedup();
                self.audit.record(Entry {
                    generation: gen.number,
                    rules,
                    src: name,
                    verb: "quota",
                    obj: format!("shm {size}"),
                    allowed: false,
                    reason: Some(e.to_string()),
                    ..Entry::default()
                });
                self.refuse_vm(vm, tag, refusal);
            }
        }
    }
}
