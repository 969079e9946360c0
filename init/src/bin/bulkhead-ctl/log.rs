//! `bulkhead-ctl log NAME [-f] [-n N]`: a service's lines from init's ring, each with its
//! wall-clock time (when the host's clock is set) and its time since boot; init's own lines
//! about the service are marked `[init]`. Lines the ring let go before they were read are
//! counted and shown. `-f` asks init for what came after the last line every 250 ms.

use std::io::Write;
use std::time::Duration;

use bulkhead_init::control::{LogFrom, LogLine, LogPage, Request, Response};
use bulkhead_init::persist::rfc3339;

use crate::conn::Conn;
use crate::CtlError;

/// How often `-f` asks.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

fn page(client: &Conn, name: &str, from: LogFrom) -> Result<LogPage, CtlError> {
    match client.call(&Request::Log {
        name: name.to_string(),
        from,
    })? {
        Response::Log(p) => Ok(p),
        Response::Error(e) => Err(CtlError::Refused(e)),
        other => Err(CtlError::Unexpected(format!("{other:?}"))),
    }
}

/// One line as text.
pub fn text(l: &LogLine) -> String {
    let stamp = if l.unix_ms >= 946_684_800_000 {
        rfc3339(l.unix_ms)
    } else {
        "-".to_string()
    };
    format!(
        "{stamp} [{:>5}.{:03}] {}{}",
        l.boot_ms / 1000,
        l.boot_ms % 1000,
        if l.from_init { "[init] " } else { "" },
        l.text
    )
}

/// The marker for lines the ring let go.
pub fn dropped(n: u64, why: &str) -> String {
    format!("-- {n} lines dropped ({why}) --")
}

/// Prints a page; false when stdout is gone (a closed pipe).
fn print(out: &mut impl Write, p: &LogPage, json: bool, why: &str, missed: u64) -> bool {
    let mut ok = true;
    if missed > 0 {
        ok &= if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({ "dropped": missed, "why": why })
            )
            .is_ok()
        } else {
            writeln!(out, "{}", dropped(missed, why)).is_ok()
        };
    }
    for l in &p.lines {
        let line = if json {
            serde_json::to_string(l).unwrap_or_default()
        } else {
            text(l)
        };
        ok &= writeln!(out, "{line}").is_ok();
    }
    ok && out.flush().is_ok()
}

/// `bulkhead-ctl log`.
pub fn run(
    client: &Conn,
    name: &str,
    lines: Option<u32>,
    follow: bool,
    json: bool,
) -> Result<(), CtlError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut p = page(client, name, LogFrom::Tail(lines.unwrap_or(u32::MAX)))?;
    // What the ring let go before the first line it still has.
    let first = p.lines.first().map_or(p.last_seq + 1, |l| l.seq);
    let before = if lines.is_none() {
        first.saturating_sub(1)
    } else {
        0
    };
    if !print(&mut out, &p, json, "the ring was full", before) {
        return Ok(());
    }
    while p.more {
        p = page(client, name, LogFrom::After(p.last_seq))?;
        if !print(&mut out, &p, json, "the ring was full", p.missed) {
            return Ok(());
        }
    }
    if !follow {
        return Ok(());
    }
    let mut last = p.last_seq;
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let p = page(client, name, LogFrom::After(last))?;
        if !print(
            &mut out,
            &p,
            json,
            "they came faster than they were read",
            p.missed,
        ) {
            return Ok(());
        }
        last = p.last_seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_both_times_and_who_said_them() {
        let l = LogLine {
            seq: 1,
            boot_ms: 12_345,
            unix_ms: 1_700_000_000_123,
            from_init: true,
            text: "started pid 7 (start 1)".into(),
        };
        assert_eq!(
            text(&l),
            "2023-11-14T22:13:20.123Z [   12.345] [init] started pid 7 (start 1)"
        );
        let l = LogLine {
            unix_ms: 0,
            from_init: false,
            ..l
        };
        assert_eq!(text(&l), "- [   12.345] started pid 7 (start 1)");
        assert_eq!(dropped(3, "x"), "-- 3 lines dropped (x) --");
    }
}
