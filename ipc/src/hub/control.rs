//! The server side of the policy control protocol (`bulkhead_policy::control`): status,
//! apply (validate-then-swap, compare-and-swap on the tree hash) and the audit log; the
//! control socket's clients (peer uid 0 or the hub's own) and what an apply leaves behind
//! (connections the new generation no longer allows).

use bulkhead_policy::control::{decode_request, ApplyResult, Request, Response};

use std::os::fd::AsRawFd;

use nix::sys::socket::MsgFlags;

use crate::channel::{Channel, ChannelError};
use crate::hub::audit::Entry;
use crate::hub::protocol::ConnId;
use crate::hub::{Hub, MAX_CONTROL_CLIENTS};

/// Decodes and answers one request.
pub fn handle(hub: &mut Hub, bytes: &[u8]) -> Response {
    let req = match decode_request(bytes) {
        Ok(r) => r,
        Err(e) => {
            return Response::Error {
                message: format!("bad request: {e}"),
            }
        }
    };
    match req {
        Request::Status => Response::Status(hub.store.status()),
        Request::Log(filter) => Response::Log(hub.audit.query(&filter)),
        Request::Apply {
            tree_hash,
            root,
            if_match,
            revoke_live,
        } => match hub.store.apply(&root, &tree_hash, if_match.as_deref()) {
            Ok(gen) => {
                let no_longer_allowed = hub.no_longer_allowed(revoke_live);
                hub.audit.record(Entry {
                    generation: gen.number,
                    src: "policyctl".into(),
                    verb: "apply",
                    obj: gen.policy.tree_hash().to_string(),
                    allowed: true,
                    ..Entry::default()
                });
                log::info!(
                    "policy generation {} applied ({})",
                    gen.number,
                    gen.policy.tree_hash()
                );
                Response::Applied(ApplyResult {
                    generation: gen.number,
                    tree_hash: gen.policy.tree_hash().to_string(),
                    revoked: revoke_live && !no_longer_allowed.is_empty(),
                    no_longer_allowed,
                })
            }
            Err(reason) => {
                let generation = hub.store.current().number;
                hub.audit.record(Entry {
                    generation,
                    src: "policyctl".into(),
                    verb: "apply",
                    obj: tree_hash,
                    allowed: false,
                    reason: Some(reason.clone()),
                    ..Entry::default()
                });
                log::warn!("apply rejected; generation {generation} keeps running: {reason}");
                Response::Error {
                    message: format!(
                        "apply rejected; generation {generation} keeps running: {reason}"
                    ),
                }
            }
        },
    }
}

impl Hub {
    pub(super) fn accept_control(&mut self) {
        let Some(l) = &self.control else {
            return;
        };
        loop {
            match l.accept() {
                Ok(ch) => {
                    let ok = ch
                        .peer_credentials()
                        .is_ok_and(|c| c.uid == 0 || c.uid == nix::unistd::geteuid().as_raw());
                    if !ok || self.clients.len() >= MAX_CONTROL_CLIENTS {
                        log::warn!("control socket: refused a client (credentials or too many)");
                        continue;
                    }
                    if ch.set_nonblocking(true).is_ok() {
                        self.clients.push(ch);
                    }
                }
                Err(ChannelError::WouldBlock) => return,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn serve_control(&mut self) {
        let mut keep = Vec::new();
        let clients = std::mem::take(&mut self.clients);
        for ch in clients {
            let alive = loop {
                match ch.try_recv_frame() {
                    Ok(raw) => {
                        drop(raw.fds);
                        let resp = self.control_request(&raw.bytes);
                        if !send_control(&ch, &resp) {
                            break false;
                        }
                    }
                    Err(ChannelError::WouldBlock) => break true,
                    Err(ChannelError::EmptyFrame { .. }) | Err(ChannelError::Truncated { .. }) => {
                        let resp = bulkhead_policy::control::Response::Error {
                            message: "bad request".into(),
                        };
                        if !send_control(&ch, &resp) {
                            break false;
                        }
                    }
                    Err(_) => break false,
                }
            };
            if alive {
                keep.push(ch);
            }
        }
        self.clients = keep;
    }

    /// Connections the running generation no longer allows, as `LiveCap`s; with `revoke`,
    /// they are closed.
    pub(super) fn no_longer_allowed(
        &mut self,
        revoke: bool,
    ) -> Vec<bulkhead_policy::control::LiveCap> {
        let gen = self.store.current();
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            if self.conn_caps(id, &gen).is_none() {
                if let Some(c) = self.conns.get(&id) {
                    out.push(bulkhead_policy::control::LiveCap {
                        kind: "connection".into(),
                        vm: self.vm_name(c.client.vm),
                        description: format!(
                            "{} → {}@{} (conn {id})",
                            self.vm_name(c.client.vm),
                            c.service,
                            self.vm_name(c.provider.vm)
                        ),
                    });
                }
                if revoke {
                    self.close_conn(id, 0);
                }
            }
        }
        let meds: Vec<ConnId> = self.meds.keys().copied().collect();
        for id in meds {
            if self.med_allowed(id) {
                continue;
            }
            if let Some(m) = self.meds.get(&id) {
                out.push(bulkhead_policy::control::LiveCap {
                    kind: "mediated socket".into(),
                    vm: self.vm_name(m.end.vm),
                    description: format!(
                        "a socket of {} passed over {}@{} (conn {id})",
                        self.vm_name(m.owner),
                        m.origin.0,
                        self.vm_name(m.origin.2)
                    ),
                });
            }
            if revoke {
                self.close_med(id);
            }
        }
        out
    }

    /// Answers one control request (bytes are untrusted).
    pub fn control_request(&mut self, bytes: &[u8]) -> bulkhead_policy::control::Response {
        handle(self, bytes)
    }
}

fn send_control(ch: &Channel, resp: &bulkhead_policy::control::Response) -> bool {
    match bulkhead_policy::control::encode_response(resp) {
        Ok(bytes) => nix::sys::socket::send(
            ch.as_raw_fd(),
            &bytes,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .is_ok(),
        Err(e) => {
            log::error!("control: cannot encode a response: {e}");
            false
        }
    }
}
