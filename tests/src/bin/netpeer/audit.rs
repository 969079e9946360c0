//! The hub's audit log as the peer prints it: `policyctl log --denied` answers one line per
//! record (`#6 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant
//! matches (+1 similar)`). Printed as is, a refused VM's tries came out as some fifty lines
//! at once, more than the emulated host's console takes in a burst on a loaded machine: init
//! dropped lines (its console writer never blocks) and with them the peer's last ones
//! (e2e run of 2026-12-07 on net2). So the peer prints a few records of each kind verbatim
//! and one count per VM and kind.

use std::collections::BTreeMap;

/// Records printed verbatim for each VM and kind.
pub const VERBATIM: usize = 2;

/// One VM's denied records of one kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Count {
    /// Records (lines).
    pub records: u64,
    /// Similar ones each record stands for (`(+n similar)`).
    pub similar: u64,
    /// The first few lines, verbatim.
    pub first: Vec<String>,
}

/// The VM and the kind of a record line (`… DENY <vm> … — <Kind>: …`). A reason that is
/// not a policy kind (`— net: provider net-vm is not running or has not registered`, a
/// connect while the provider is away) is its whole text, without `(+n similar)`.
pub fn parse_record(line: &str) -> Option<(String, String)> {
    let rest = line.split_once(" DENY ")?.1;
    let vm = rest.split_whitespace().next()?.to_string();
    let reason = rest.split_once("— ")?.1.trim();
    let reason = match reason.rsplit_once(" (+") {
        Some((r, tail)) if tail.ends_with(" similar)") => r,
        _ => reason,
    };
    let first = reason.split(':').next()?.trim();
    let is_kind = first.starts_with(|c: char| c.is_ascii_uppercase())
        && first.chars().all(|c| c.is_ascii_alphanumeric());
    let kind = if is_kind { first } else { reason };
    (!kind.is_empty()).then(|| (vm, kind.to_string()))
}

/// Counts per (VM, kind) of `policyctl log --denied`'s output; lines that are not
/// records are returned apart.
pub fn summarize(out: &str) -> (BTreeMap<(String, String), Count>, Vec<String>) {
    let mut counts: BTreeMap<(String, String), Count> = BTreeMap::new();
    let mut other = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let Some(key) = parse_record(line) else {
            other.push(line.to_string());
            continue;
        };
        let c = counts.entry(key).or_default();
        c.records += 1;
        c.similar += line
            .rsplit_once("(+")
            .and_then(|(_, r)| r.strip_suffix(" similar)"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if c.first.len() < VERBATIM {
            c.first.push(line.to_string());
        }
    }
    (counts, other)
}

/// The peer's lines: the first records of each kind verbatim, then one count line each
/// (`audit: nogrant-vm NoGrant: 45 records (+12 similar)`).
pub fn lines(out: &str) -> Vec<String> {
    let (counts, other) = summarize(out);
    let mut v = other;
    for ((vm, kind), c) in &counts {
        v.extend(c.first.iter().cloned());
        v.push(format!(
            "audit: {vm} {kind}: {} records (+{} similar)",
            c.records, c.similar
        ));
    }
    if counts.is_empty() {
        v.push("audit: no denied records".to_string());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str =
        "#6 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant matches
#8 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant matches (+1 similar)
#9 gen 1 DENY app-vm connect net@net-vm  — net: provider net-vm is not running or has not registered (+2 similar)
#10 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant matches (+3 similar)
";

    #[test]
    fn records_are_counted_by_vm_and_kind_and_a_few_kept_verbatim() {
        let l = lines(LOG);
        assert_eq!(
            l,
            vec![
                "#9 gen 1 DENY app-vm connect net@net-vm  — net: provider net-vm is not running or has not registered (+2 similar)",
                "audit: app-vm net: provider net-vm is not running or has not registered: 1 records (+2 similar)",
                "#6 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant matches",
                "#8 gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: no connect grant matches (+1 similar)",
                "audit: nogrant-vm NoGrant: 3 records (+4 similar)",
            ]
        );
    }

    #[test]
    fn fifty_records_become_a_few_lines() {
        let log: String = (0..50)
            .map(|i| format!("#{i} gen 1 DENY nogrant-vm connect net@net-vm  — NoGrant: x\n"))
            .collect();
        let l = lines(&log);
        assert_eq!(l.len(), VERBATIM + 1);
        assert_eq!(
            l.last().map(String::as_str),
            Some("audit: nogrant-vm NoGrant: 50 records (+0 similar)")
        );
    }

    #[test]
    fn other_lines_and_an_empty_log() {
        assert_eq!(lines(""), vec!["audit: no denied records"]);
        let l = lines("no audit log yet\n");
        assert_eq!(l, vec!["no audit log yet", "audit: no denied records"]);
        assert_eq!(parse_record("#1 gen 1 ALLOW a connect b"), None);
    }
}
