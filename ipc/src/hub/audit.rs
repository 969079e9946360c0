//! The audit log: one JSON line per decision record, to a file or stderr, plus a bounded
//! in-memory ring that `policyctl log` reads over the control socket.
//!
//! Records use [`AuditRecord`] from `bulkhead-policy` (the format of `policyctl log
//! --json`): sequence, generation, rules, source, verb, object, fd types and rights,
//! decision, reason. Every denial gets exactly one record. Connects and provides are
//! recorded when allowed too; allowed transfers are counted but not written one by one
//! (they are the hot path), and the count appears in the next record as `similar` of a
//! `transfer` summary written when a connection closes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_policy::control::{AuditRecord, LogBatch, LogFilter};

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
        })
    }

    /// Records one decision.
    pub fn record(&mut self, e: Entry) {
        let rec = AuditRecord {
            seq: self.next_seq,
            generation: e.generation,
            time_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            rules: e.rules,
            src: e.src,
            verb: e.verb.to_string(),
            obj: e.obj,
            fds: e.fds,
            allowed: e.allowed,
            reason: e.reason,
            similar: e.similar,
        };
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
    pub fn query(&self, f: &LogFilter) -> LogBatch {
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
