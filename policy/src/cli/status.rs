//! `policyctl status`: the hub's running generation.

use super::hub::{hub_request, hub_unexpected};
use super::{print_json, Ctx, OK};
use crate::control::{Request, Response};

/// Runs `status`.
pub fn run(cx: &Ctx) -> u8 {
    match hub_request(cx, &Request::Status) {
        Ok(Response::Status(s)) => {
            if cx.json {
                print_json(&s);
            } else {
                println!("generation {}\ntree {}", s.generation, s.tree_hash);
                for f in &s.files {
                    println!("  {f}");
                }
                match &s.last_rejected {
                    Some(r) => println!(
                        "last rejected apply: {} at {}: {}",
                        r.tree_hash, r.at_unix, r.reason
                    ),
                    None => println!("no rejected apply"),
                }
            }
            OK
        }
        Ok(other) => hub_unexpected(cx, other),
        Err(c) => c,
    }
}
