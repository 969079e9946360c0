//! Each service's log in init's memory: a ring of its last lines (its output, and init's
//! own lines about it), bounded in lines and in bytes, each with a sequence number and two
//! timestamps (since boot, and the wall clock). `bulkhead-ctl log` reads it; a reader that
//! fell behind learns how many lines the ring let go before it could read them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Sequence number in this service's log (1 for the first line ever).
    pub seq: u64,
    /// Milliseconds since boot (CLOCK_BOOTTIME) when init read it.
    pub boot_ms: u64,
    /// Milliseconds since the epoch (CLOCK_REALTIME) when init read it; 0 if unknown.
    pub unix_ms: u64,
    /// Init's own line about the service (started, exited, …), not the service's output.
    pub from_init: bool,
    /// The text, without its newline (invalid UTF-8 replaced).
    pub text: String,
}

/// Where a log read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFrom {
    /// The last N lines.
    Tail(u32),
    /// Lines with a sequence number above this one (`log -f` passes the last it saw).
    After(u64),
}

/// An answer to a log read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    /// The lines, oldest first.
    pub lines: Vec<LogLine>,
    /// Pass as `LogFrom::After` to read on.
    pub last_seq: u64,
    /// Lines between the requested start and the first line here that the ring had
    /// already let go (0 when nothing was missed).
    pub missed: u64,
    /// Lines the ring has let go since boot.
    pub dropped_total: u64,
    /// More lines are ready now (the page was full).
    pub more: bool,
}

/// The bounded ring of one service.
#[derive(Debug, Clone)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    max_lines: usize,
    max_bytes: usize,
    next_seq: u64,
    dropped: u64,
}

/// What one line costs in the ring besides its text.
const LINE_OVERHEAD: usize = 48;

impl LogRing {
    /// An empty ring keeping at most `max_lines` lines and `max_bytes` bytes.
    pub fn new(max_lines: usize, max_bytes: usize) -> Self {
        LogRing {
            lines: VecDeque::new(),
            bytes: 0,
            max_lines: max_lines.max(1),
            max_bytes: max_bytes.max(LINE_OVERHEAD + 1),
            next_seq: 1,
            dropped: 0,
        }
    }

    /// Appends a line, letting the oldest go while a bound is exceeded. A line longer
    /// than the byte bound is cut to fit.
    pub fn push(&mut self, text: &[u8], from_init: bool, boot_ms: u64, unix_ms: u64) -> u64 {
        let room = self.max_bytes - LINE_OVERHEAD;
        let text = String::from_utf8_lossy(text.get(..text.len().min(room)).unwrap_or(text));
        let mut text = text.into_owned();
        while text.len() > room {
            text.pop();
        }
        let cost = text.len() + LINE_OVERHEAD;
        while !self.lines.is_empty()
            && (self.lines.len() >= self.max_lines || self.bytes + cost > self.max_bytes)
        {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.text.len() + LINE_OVERHEAD;
                self.dropped += 1;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += cost;
        self.lines.push_back(LogLine {
            seq,
            boot_ms,
            unix_ms,
            from_init,
            text,
        });
        seq
    }

    /// The last sequence number handed out (0 before the first line).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Lines let go so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Lines kept now.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// True when no line is kept.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Bytes the kept lines count for.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Reads from `from`, at most `budget` bytes of text (always at least one line if any
    /// is there).
    pub fn read(&self, from: LogFrom, budget: usize) -> LogPage {
        let first_kept = self.lines.front().map_or(self.next_seq, |l| l.seq);
        let (start, missed) = match from {
            LogFrom::Tail(n) => {
                let n = u64::from(n).min(self.lines.len() as u64);
                (self.next_seq - n, 0)
            }
            LogFrom::After(seq) => {
                let want = seq.saturating_add(1).min(self.next_seq);
                if want < first_kept {
                    (first_kept, first_kept - want)
                } else {
                    (want, 0)
                }
            }
        };
        let skip = usize::try_from(start - first_kept).unwrap_or(usize::MAX);
        let mut page = LogPage {
            lines: Vec::new(),
            last_seq: start.saturating_sub(1),
            missed,
            dropped_total: self.dropped,
            more: false,
        };
        let mut used = 0usize;
        for line in self.lines.iter().skip(skip) {
            let cost = line.text.len() + LINE_OVERHEAD;
            if !page.lines.is_empty() && used + cost > budget {
                page.more = true;
                break;
            }
            used += cost;
            page.last_seq = line.seq;
            page.lines.push(line.clone());
        }
        page
    }
}

/// Milliseconds since boot (CLOCK_BOOTTIME: the kernel's own timestamps), 0 if unreadable.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    let ms = i128::from(ts.tv_sec) * 1000 + i128::from(ts.tv_nsec) / 1_000_000;
    u64::try_from(ms).unwrap_or(0)
}

/// Milliseconds since the epoch, 0 if the clock is before it.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

/// (since boot, since the epoch) in milliseconds, now.
pub fn now_stamps() -> (u64, u64) {
    (boot_ms(), unix_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(p: &LogPage) -> Vec<String> {
        p.lines.iter().map(|l| l.text.clone()).collect()
    }

    #[test]
    fn keeps_the_last_lines_within_both_bounds_and_counts_what_it_lets_go() {
        let mut r = LogRing::new(3, 1 << 20);
        for i in 1..=5 {
            assert_eq!(r.push(format!("l{i}").as_bytes(), false, i, 0), i);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.dropped(), 2);
        assert_eq!(
            texts(&r.read(LogFrom::Tail(10), 1 << 20)),
            ["l3", "l4", "l5"]
        );
        assert_eq!(texts(&r.read(LogFrom::Tail(2), 1 << 20)), ["l4", "l5"]);
        assert!(r.read(LogFrom::Tail(0), 1 << 20).lines.is_empty());

        // A byte bound: each line costs its text plus the overhead.
        let mut r = LogRing::new(1000, 3 * (LINE_OVERHEAD + 10));
        for i in 0..10 {
            r.push(&[b'a' + i; 10], false, 0, 0);
        }
        assert_eq!(r.len(), 3);
        assert!(r.bytes() <= 3 * (LINE_OVERHEAD + 10));
        assert_eq!(r.dropped(), 7);
    }

    #[test]
    fn a_follower_reads_on_and_learns_what_it_missed() {
        let mut r = LogRing::new(4, 1 << 20);
        for i in 1..=3 {
            r.push(format!("l{i}").as_bytes(), false, 0, 0);
        }
        let p = r.read(LogFrom::After(1), 1 << 20);
        assert_eq!(texts(&p), ["l2", "l3"]);
        assert_eq!((p.last_seq, p.missed, p.more), (3, 0, false));
        // Nothing new: an empty page that keeps the cursor.
        let p = r.read(LogFrom::After(3), 1 << 20);
        assert!(p.lines.is_empty());
        assert_eq!(p.last_seq, 3);
        // Six more lines while the follower slept: two of them are gone already.
        for i in 4..=9 {
            r.push(format!("l{i}").as_bytes(), false, 0, 0);
        }
        let p = r.read(LogFrom::After(3), 1 << 20);
        assert_eq!(texts(&p), ["l6", "l7", "l8", "l9"]);
        assert_eq!((p.missed, p.dropped_total), (2, 5));
        // A cursor from the future (another boot) reads nothing and is not an error.
        let p = r.read(LogFrom::After(1000), 1 << 20);
        assert!(p.lines.is_empty());
        assert_eq!(p.last_seq, 9);
    }

    #[test]
    fn pages_are_bounded_but_never_empty_when_lines_wait() {
        let mut r = LogRing::new(100, 1 << 20);
        for _ in 0..10 {
            r.push(&[b'x'; 100], false, 0, 0);
        }
        let p = r.read(LogFrom::Tail(10), 350);
        assert_eq!(p.lines.len(), 2);
        assert!(p.more);
        let p2 = r.read(LogFrom::After(p.last_seq), 1);
        assert_eq!(p2.lines.len(), 1, "one line even past the budget");
        assert_eq!(p2.lines[0].seq, 3);
    }

    #[test]
    fn long_and_invalid_lines_are_cut_and_replaced_not_refused() {
        let mut r = LogRing::new(10, LINE_OVERHEAD + 8);
        r.push(b"0123456789abcdef", true, 5, 6);
        r.push(&[0xff, 0xfe, b'o', b'k'], false, 7, 8);
        let p = r.read(LogFrom::Tail(10), 1 << 20);
        assert_eq!(p.lines.len(), 1);
        assert!(p.lines[0].text.len() <= 8);
        assert!(p.lines[0].text.ends_with("ok"), "{:?}", p.lines[0].text);
    }

    proptest::proptest! {
        #[test]
        fn bounds_always_hold(lines in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..200),
                              max_lines in 1usize..50, max_bytes in 0usize..4096, from in 0u64..300) {
            let mut r = LogRing::new(max_lines, max_bytes);
            for l in &lines {
                r.push(l, false, 0, 0);
            }
            proptest::prop_assert!(r.len() <= max_lines.max(1));
            proptest::prop_assert!(r.bytes() <= max_bytes.max(LINE_OVERHEAD + 1));
            proptest::prop_assert_eq!(r.dropped() + r.len() as u64, lines.len() as u64);
            let p = r.read(LogFrom::After(from), 1000);
            let mut prev = from;
            for l in &p.lines {
                proptest::prop_assert!(l.seq > prev);
                prev = l.seq;
            }
        }
    }
}
