//! Talking to the hub's policy control socket.

use super::{print_json, Ctx, FAIL};
use crate::control::{HubClient, Request, Response};
use crate::{Policy, PolicyTree, ValidateOptions};

/// The hub's running generation, rebuilt from the files it exports.
pub(crate) struct Running {
    /// Its number.
    pub generation: u64,
    /// Its tree hash.
    pub tree_hash: String,
    /// Its policy.
    pub policy: Policy,
}

impl Running {
    /// How it is named in messages.
    pub fn describe(&self) -> String {
        format!(
            "running generation {} ({})",
            self.generation, self.tree_hash
        )
    }
}

/// Asks the hub for its running generation, rebuilds the tree from the files it sends,
/// checks that they hash to what it runs, and compiles them. Errors are printed.
pub(crate) fn running(cx: &Ctx) -> Result<Running, u8> {
    let t = match hub_request(cx, &Request::Tree)? {
        Response::Tree(t) => t,
        other => return Err(hub_unexpected(cx, other)),
    };
    if t.generation == 0 {
        // The boot-time fail-closed policy: no files, nothing allowed.
        return Ok(Running {
            generation: 0,
            tree_hash: t.tree_hash,
            policy: Policy::deny_all(),
        });
    }
    let files: Vec<(String, Vec<u8>)> = t.files.into_iter().map(|f| (f.name, f.bytes)).collect();
    let tree = PolicyTree::from_files(&files);
    let fail = |msg: String| {
        if cx.json {
            print_json(&serde_json::json!({"status": "error", "message": msg}));
        } else {
            eprintln!("error: {msg}");
        }
        FAIL
    };
    if tree.hash != t.tree_hash {
        return Err(fail(format!(
            "the hub runs generation {} ({}) but sent files that hash to {}",
            t.generation, t.tree_hash, tree.hash
        )));
    }
    // The hub accepted it with its own options: warnings (unknown VMs…) stay warnings.
    let opts = ValidateOptions {
        strict: false,
        ..cx.opts.clone()
    };
    match tree.compile(&opts) {
        Ok(c) => Ok(Running {
            generation: t.generation,
            tree_hash: t.tree_hash,
            policy: c.policy,
        }),
        Err(d) => Err(fail(format!(
            "the hub's running generation {} does not compile here:\n{d}",
            t.generation
        ))),
    }
}

/// `--from running` / `--against running`.
pub(crate) fn is_running(dir: Option<&std::path::Path>) -> bool {
    dir == Some(std::path::Path::new("running"))
}

/// One request to the hub; an error is printed and becomes the exit code.
pub(crate) fn hub_request(cx: &Ctx, req: &Request) -> Result<Response, u8> {
    let r = HubClient::connect(&cx.hub).and_then(|c| c.request(req));
    r.map_err(|e| {
        if cx.json {
            print_json(&serde_json::json!({"status": "error", "message": e.to_string()}));
        } else {
            eprintln!("error: {e}");
        }
        FAIL
    })
}

/// Prints an answer the command did not expect; returns the exit code.
pub(crate) fn hub_unexpected(cx: &Ctx, r: Response) -> u8 {
    let msg = match r {
        Response::Error { message } => message,
        other => format!("unexpected answer from the hub: {other:?}"),
    };
    if cx.json {
        print_json(&serde_json::json!({"status": "error", "message": msg}));
    } else {
        eprintln!("error: hub: {msg}");
    }
    FAIL
}
