//! `quota`: per-VM settings, and the whole numbers and sizes they take.

use super::{err, params, printable, LResult};
use crate::ast::{Action, Effect};
use crate::lex::Token;

pub(super) fn count_param(k: &str, v: &str, col: u32) -> LResult<u64> {
    if v.starts_with('-') {
        return err(
            col,
            format!("`{k}` cannot be negative"),
            format!("write {k}=N with N ≥ 0"),
        );
    }
    if !v.chars().all(|c| c.is_ascii_digit()) {
        return err(
            col,
            format!("`{k}={}` is not a whole number", printable(v)),
            format!("write {k}=N, e.g. {k}=256"),
        );
    }
    v.parse::<u64>().or_else(|_| {
        err(
            col,
            format!("`{k}={}` is too large", printable(v)),
            "the value must fit in 64 bits",
        )
    })
}

/// Parse a `SIZE`: an integer with a binary unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`).
pub fn parse_size(v: &str) -> Result<u64, (String, String)> {
    let units: [(&str, u64); 5] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    if v.starts_with('-') {
        return Err((
            "sizes cannot be negative".into(),
            "write e.g. shm=64MiB".into(),
        ));
    }
    let digits_end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(digits_end);
    if num.is_empty() {
        return Err((
            format!("`{}` is not a size", printable(v)),
            "write an integer with a binary unit, e.g. 64MiB".into(),
        ));
    }
    if unit.starts_with('.') {
        return Err((
            "fractional sizes are not allowed".into(),
            "use a smaller unit, e.g. 1536MiB instead of 1.5GiB".into(),
        ));
    }
    if unit.is_empty() {
        return Err((
            "size has no unit".into(),
            format!("write {num}B for bytes, or use KiB, MiB, GiB"),
        ));
    }
    let Some(mult) = units.iter().find(|(u, _)| *u == unit).map(|(_, m)| *m) else {
        let hint = match unit {
            "KB" | "kB" | "K" | "k" => format!("binary units only: did you mean {num}KiB?"),
            "MB" | "M" | "m" => format!("binary units only: did you mean {num}MiB?"),
            "GB" | "G" | "g" => format!("binary units only: did you mean {num}GiB?"),
            "TB" | "T" => format!("binary units only: did you mean {num}TiB?"),
            _ => "units are B, KiB, MiB, GiB, TiB".into(),
        };
        return Err((format!("unknown size unit `{}`", printable(unit)), hint));
    };
    let n: u64 = num.parse().map_err(|_| {
        (
            "size does not fit in 64 bits".to_string(),
            "use a smaller value".to_string(),
        )
    })?;
    n.checked_mul(mult).ok_or_else(|| {
        (
            "size does not fit in 64 bits".to_string(),
            "use a smaller value".to_string(),
        )
    })
}

pub(super) fn parse_quota(
    effect: Effect,
    verb: &Token<'_>,
    after: &[Token<'_>],
) -> LResult<Action> {
    if effect == Effect::Deny {
        return err(verb.col, "a quota cannot be denied", "quotas are settings, not permissions: grant a smaller quota (the most specific one wins)");
    }
    if let Some(t) = after.first() {
        if !t.text.contains('=') {
            return err(
                t.col,
                "`quota` takes no object",
                "write e.g. `grant browser quota shm=64MiB vfds=256`",
            );
        }
    }
    let mut shm = None;
    let mut shm_count = None;
    let mut vfds = None;
    for (k, v, col) in params(effect, after, &["shm", "shm-count", "vfds"])? {
        match k {
            "shm" => shm = Some(parse_size(v).or_else(|(m, h)| err(col, m, h))?),
            "shm-count" => shm_count = Some(count_param(k, v, col)?),
            _ => vfds = Some(count_param(k, v, col)?),
        }
    }
    if shm.is_none() && shm_count.is_none() && vfds.is_none() {
        return err(
            verb.col,
            "`quota` sets nothing",
            "give at least one of shm=SIZE, shm-count=N, vfds=N",
        );
    }
    Ok(Action::Quota {
        shm,
        shm_count,
        vfds,
    })
}
