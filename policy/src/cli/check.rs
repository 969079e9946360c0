//! `policyctl check` / `explain`: ALLOW or DENY with the rules that decided it.

use std::path::{Path, PathBuf};

use clap::ValueEnum;

use super::{load_current, print_json, Ctx, FAIL, OK, USAGE};
use crate::explain::{
    explain_connect, explain_device, explain_provide, Explanation, TransferQuery,
};
use crate::parse::{parse_bdf, parse_caps};
use crate::Direction;

/// Arguments of `check` and `explain`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The source VM.
    src: String,
    /// connect, device, provide or quota.
    verb: String,
    /// The object: SERVICE[@PROVIDER] or pci:DDDD:BB:DD.F (none for quota).
    obj: Option<String>,
    /// Also check sending an fd of this type with these rights, e.g. memfd:rw.
    #[arg(long, value_name = "TYPE:RIGHTS")]
    fd: Option<String>,
    /// Direction of the --fd transfer.
    #[arg(long, value_enum, default_value = "c2s")]
    dir: DirArg,
    /// Number of fds in the message.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Evaluate against this tree instead of --root / the installed tree.
    #[arg(long, value_name = "DIR")]
    against: Option<PathBuf>,
}

/// Direction of a transfer.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DirArg {
    /// Client to service.
    C2s,
    /// Service to client.
    S2c,
}

fn print_explanation(cx: &Ctx, ex: &Explanation) {
    if cx.json {
        print_json(ex);
        return;
    }
    println!("{} {}", if ex.allowed { "ALLOW" } else { "DENY" }, ex.query);
    if let Some(g) = &ex.granted {
        println!("  granted: {g}");
    }
    for m in &ex.matching {
        println!("  grant: {m}");
    }
    for d in &ex.winning_deny {
        println!("  deny:  {d}");
    }
    if !ex.allowed {
        for m in &ex.nearest_miss {
            println!("  nearest miss: {m}");
        }
        if let Some(r) = &ex.reason {
            println!("  audit reason: {r}");
        }
    }
    for q in &ex.quota {
        println!("  quota: {q}");
    }
}

/// Runs `check` (and `explain`).
pub fn run(cx: &Ctx, a: &CheckArgs) -> u8 {
    if a.against.as_deref() == Some(Path::new("running")) {
        eprintln!("error: --against running needs a check request in the hub's control protocol, which it does not have yet; use --against DIR");
        return USAGE;
    }
    let p = match load_current(cx, a.against.as_deref()) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let obj = a.obj.as_deref().unwrap_or("");
    let ex = match a.verb.as_str() {
        "connect" => {
            let (service, provider) = match obj.split_once('@') {
                Some((s, p)) => (s, Some(p)),
                None => (obj, None),
            };
            let transfer = match &a.fd {
                None => None,
                Some(spec) => match parse_caps(spec).ok().and_then(|c| {
                    let mut e = c.entries();
                    let first = e.next();
                    if e.next().is_some() {
                        None
                    } else {
                        first
                    }
                }) {
                    Some((fd_type, rights)) => Some(TransferQuery {
                        fd_type,
                        rights,
                        dir: match a.dir {
                            DirArg::C2s => Direction::C2s,
                            DirArg::S2c => Direction::S2c,
                        },
                        count: a.count,
                    }),
                    None => {
                        eprintln!("error: --fd takes one TYPE:RIGHTS, e.g. memfd:rw or pipe:write");
                        return USAGE;
                    }
                },
            };
            explain_connect(&p, &a.src, service, provider, transfer)
        }
        "device" => match parse_bdf(obj) {
            Ok(b) => explain_device(&p, &a.src, b),
            Err(e) => {
                eprintln!("error: {e}");
                return USAGE;
            }
        },
        "provide" => explain_provide(&p, &a.src, obj),
        "quota" => {
            let q = p.quota_for(&a.src);
            if cx.json {
                print_json(&q);
            } else {
                println!(
                    "{} quota: shm={} shm-count={} vfds={}",
                    a.src,
                    crate::ast::format_size(q.shm.value),
                    q.shm_count.value,
                    q.vfds.value
                );
                for (k, v) in [
                    ("shm", &q.shm),
                    ("shm-count", &q.shm_count),
                    ("vfds", &q.vfds),
                ] {
                    println!(
                        "  {k} from {}",
                        v.from
                            .as_ref()
                            .map_or("nothing (default 0)".into(), |r| r.to_string())
                    );
                }
            }
            return OK;
        }
        other => {
            eprintln!("error: unknown verb `{other}` (connect, device, provide or quota)");
            return USAGE;
        }
    };
    print_explanation(cx, &ex);
    if ex.allowed {
        OK
    } else {
        FAIL
    }
}
