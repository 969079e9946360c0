//! The server side of the policy control protocol (`bulkhead_policy::control`): status,
//! apply (validate-then-swap, compare-and-swap on the tree hash) and the audit log.

use bulkhead_policy::control::{decode_request, ApplyResult, Request, Response};

use crate::hub::audit::Entry;
use crate::hub::Hub;

/// Decodes and answers one request. `from_root`: the client is uid 0; anyone else the hub
/// admitted (its own uid) may read the status and the audit log but never apply a policy.
pub fn handle(hub: &mut Hub, bytes: &[u8], from_root: bool) -> Response {
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
        Request::Apply { .. } if !from_root => {
            log::warn!("control socket: apply refused: the client is not root");
            Response::Error {
                message: "permission denied: only root may apply a policy".into(),
            }
        }
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
