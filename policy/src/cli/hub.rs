//! Talking to the hub's policy control socket.

use super::{print_json, Ctx, FAIL};
use crate::control::{HubClient, Request, Response};

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
