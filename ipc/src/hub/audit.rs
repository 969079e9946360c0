//! The audit log: one JSON line per decision record, to a file or stderr, plus a bounded
//! in-memory ring that `policyctl log` reads over the control socket.
//!
//! Records use [`AuditRecord`] from `bulkhead-policy` (the format of `policyctl log
//! --json`): sequence, generation, rules, source, verb, object, fd types and rights,
//! decision, reason. Every denial is in exactly one record: repeats of the same denial are
//! coalesced into one record with `similar = n` ("+n similar": it stands for n more
//! denials identical to the record before it). Connects and provides are
//! recorded when allowed too; allowed transfers are counted but not written one by one
//! (they are the hot path), and the count appears in the next record as `similar` of a
//! `transfer` summary written when a connection closes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_policy::control::{AuditRecord, LogBatch, LogFilter};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records kept in memory for `policyctl log`.
pub const RING: usize = 4096;

/// Where JSON lines go.
#[derive(Debug)]
enum Sink {
    File(File),
    Stderr,
}

/// The audit log.
#[derive(Debug)]
pub struct Audit {
    sink: Sink,
    ring: VecDeque<AuditRecord>,
    next_seq: u64,
    /// The last denial written, to recognise repeats.
    last_denial: Option<AuditRecord>,
    /// Repeats of `last_denial` not written yet.
    suppressed: u32,
}

/// Same decision: everything but sequence, time and the count.
fn same_decision(a: &AuditRecord, b: &AuditRecord) -> bool {
    a.generation == b.generation
        && a.src == b.src
        && a.verb == b.verb
        && a.obj == b.obj
        && a.fds == b.fds
        && a.rules == b.rules
        && a.allowed == b.allowed
        && a.reason == b.reason
}

/// The fields of a record the caller fills in.
#[derive(Debug, Default)]
pub struct Entry {
    /// Generation that decided.
    pub generation: u64,
    /// Deciding rules (`file:line`).
    pub rules: Vec<String>,
    /// Source VM (from the channel).
    pub src: String,
    /// Verb.
    pub verb: &'static str,
    /// Object.
    pub obj: String,
    /// Fd types and rights.
    pub fds: Vec<String>,
    /// Allowed?
    pub allowed: bool,
    /// Why not (host only).
    pub reason: Option<String>,
    /// Coalesced count.
    pub similar: u32,
}

impl Audit {
    /// Appends to `path` (created 0600 if missing), or writes to stderr when `None`.
    pub fn open(path: Option<&Path>) -> std::io::Result<Audit> {
        let sink = match path {
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                Sink::File(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .mode(0o600)
                        .open(p)?,
                )
            }
            None => Sink::Stderr,
        };
        Ok(Audit {
            sink,
            ring: VecDeque::new(),
            next_seq: 1,
            last_denial: None,
            suppressed: 0,
        })
    }

    /// Records one decision. A denial identical to the previous one (same generation,
    /// source, object, fds, rules and reason) is counted instead of written; the count goes
    /// out as one record with `similar = n` when a different record comes, on
    /// [`Audit::flush`] (the hub's tick) and before a query.
    pub fn record(&mut self, e: Entry) {
        let rec = AuditRecord {
            seq: 0,
            generation: e.generation,
            time_unix: now(),
            rules: e.rules,
            src: e.src,
            verb: e.verb.to_string(),
            obj: e.obj,
            fds: e.fds,
            allowed: e.allowed,
            reason: e.reason,
            similar: e.similar,
        };
        if !rec.allowed {
            if let Some(last) = &self.last_denial {
                if same_decision(last, &rec) {
                    self.suppressed = self.suppressed.saturating_add(1);
                    return;
                }
            }
        }
        self.flush();
        if !rec.allowed {
            self.last_denial = Some(rec.clone());
        } else {
            self.last_denial = None;
        }
        self.write(rec);
    }

    /// Writes the count of suppressed repeats, if any.
    pub fn flush(&mut self) {
        if self.suppressed == 0 {
            return;
        }
        if let Some(last) = &self.last_denial {
            let mut rec = last.clone();
            rec.similar = self.suppressed;
            rec.time_unix = now();
            self.write(rec);
        }
        self.suppressed = 0;
    }

    fn write(&mut self, mut rec: AuditRecord) {
        rec.seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        match serde_json::to_string(&rec) {
            Ok(line) => {
                let res = match &mut self.sink {
                    Sink::File(f) => writeln!(f, "{line}"),
                    Sink::Stderr => writeln!(std::io::stderr(), "{line}"),
                };
                if let Err(err) = res {
                    log::error!("audit log write failed: {err}");
                }
            }
            Err(err) => log::error!("audit record not serializable: {err}"),
        }
        if self.ring.len() >= RING {
            self.ring.pop_front();
        }
        self.ring.push_back(rec);
    }

    /// Records matching `f`, oldest first, at most `f.max` (0: 256).
    pub fn query(&mut self, f: &LogFilter) -> LogBatch {
        self.flush();
        let max = if f.max == 0 { 256 } else { f.max.min(1024) } as usize;
        let records: Vec<AuditRecord> = self
            .ring
            .iter()
            .filter(|r| r.seq >= f.since_seq)
            .filter(|r| !f.denied_only || !r.allowed)
            .filter(|r| f.vm.as_ref().is_none_or(|vm| &r.src == vm))
            .take(max)
            .cloned()
            .collect();
        let next_seq = records
            .last()
            .map_or(f.since_seq.max(1), |r| r.seq.saturating_add(1));
        LogBatch { records, next_seq }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny(obj: &str) -> Entry {
        Entry {
            generation: 1,
            src: "b".into(),
            verb: "connect",
            obj: obj.into(),
            reason: Some("no rule".into()),
            ..Entry::default()
        }
    }

    #[test]
    fn repeated_denials_are_coalesced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut a = Audit::open(Some(&path)).unwrap();
        for _ in 0..50 {
            a.record(deny("x@y"));
        }
        a.record(deny("other"));
        a.flush();
        let lines: Vec<AuditRecord> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!((lines[0].obj.as_str(), lines[0].similar), ("x@y", 0));
        assert_eq!((lines[1].obj.as_str(), lines[1].similar), ("x@y", 49));
        assert_eq!(lines[2].obj, "other");
        let seqs: Vec<u64> = lines.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let batch = a.query(&LogFilter {
            denied_only: true,
            ..LogFilter::default()
        });
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.next_seq, 4);
    }
}
