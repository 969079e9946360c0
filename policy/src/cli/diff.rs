//! `policyctl diff`: the semantic difference of two trees, per VM.

use std::path::Path;

use super::{load_current, print_json, Ctx, FAIL, OK, USAGE};
use crate::{diff, RootDir};

/// Runs `diff`.
pub fn run(cx: &Ctx, from: Option<&Path>, to: Option<&Path>) -> u8 {
    if from == Some(Path::new("running")) {
        eprintln!("error: --from running needs the hub to export its tree, which it does not yet; use --from DIR");
        return USAGE;
    }
    let old = match from {
        Some(d) => load_current(cx, Some(d)),
        None => cx.load(&RootDir::defaults()).map(|(_, c)| c.policy),
    };
    let (Ok(old), Ok(new)) = (old, load_current(cx, to)) else {
        return FAIL;
    };
    let changes = diff::diff(&old, &new);
    if cx.json {
        print_json(&changes);
    } else {
        for c in &changes {
            println!("{c}");
        }
    }
    OK
}
