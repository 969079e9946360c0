//! The server side of the policy control protocol (`bulkhead_policy::control`): status,
//! apply (validate-then-swap, compare-and-swap on the tree hash), the audit log, and the
//! running generation's files (what `policyctl` diffs against).

use bulkhead_policy::control::{decode_request, ApplyResult, Request, Response, MAX_MESSAGE};

use crate::hub::audit::Entry;
use crate::hub::Hub;

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
        Request::Tree => {
            let tree = hub.store.running_tree();
            let size: usize = tree
                .files
                .iter()
                .map(|f| f.name.len() + f.bytes.len())
                .sum();
            // Leave room for the framing; a bigger tree cannot travel in one message.
            if size > MAX_MESSAGE - 4096 {
                Response::Error {
                    message: format!(
                        "the running tree is {size} bytes, more than one control message \
                         carries; compare with a directory instead (--from DIR)"
                    ),
                }
            } else {
                Response::Tree(tree)
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
