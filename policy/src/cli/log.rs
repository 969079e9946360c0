//! `policyctl log`: the hub's audit log.

use super::hub::{hub_request, hub_unexpected};
use super::{Ctx, OK};
use crate::control::{LogFilter, Request, Response};

/// Runs `log`.
pub fn run(cx: &Ctx, denied: bool, vm: Option<String>, follow: bool, since: u64) -> u8 {
    let mut filter = LogFilter {
        denied_only: denied,
        vm,
        since_seq: since,
        max: 1000,
    };
    loop {
        match hub_request(cx, &Request::Log(filter.clone())) {
            Ok(Response::Log(b)) => {
                for r in &b.records {
                    if cx.json {
                        match serde_json::to_string(r) {
                            Ok(s) => println!("{s}"),
                            Err(e) => eprintln!("error: {e}"),
                        }
                    } else {
                        let similar = if r.similar > 0 {
                            format!(" (+{} similar)", r.similar)
                        } else {
                            String::new()
                        };
                        println!(
                            "#{} gen {} {} {} {} {} {}{}{similar}",
                            r.seq,
                            r.generation,
                            if r.allowed { "ALLOW" } else { "DENY" },
                            r.src,
                            r.verb,
                            r.obj,
                            r.fds.join(","),
                            r.reason
                                .as_ref()
                                .map(|x| format!(" — {x}"))
                                .unwrap_or_default()
                        );
                    }
                }
                filter.since_seq = b.next_seq;
                if !follow {
                    return OK;
                }
                if b.records.is_empty() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            Ok(other) => return hub_unexpected(cx, other),
            Err(c) => return c,
        }
    }
}
