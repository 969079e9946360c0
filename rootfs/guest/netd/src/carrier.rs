//! Waiting for an interface's carrier by the clock, not by a count of polls
//! (`bulkhead-netprobe carrier`, used by the app VMs of the net systems).
//!
//! The app VMs used to wait in their shell script with a bounded loop of `cat carrier;
//! sleep 0.2` and then say "no carrier after 30 s" after 150 rounds. Under nested emulation
//! each round's two process starts cost far more than the pause (the e2e run of
//! 2026-12-07 took about 70 s for its "30 s", more on a loaded machine), so how long the
//! wait lasted, and what the line claimed, depended on the machine's load. Here the wait
//! ends by a deadline on the monotonic clock, whatever a poll costs, and says how long it
//! really waited.

use std::time::Duration;

/// How a wait for the carrier ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CarrierWait {
    /// The carrier came after this long (by the clock).
    Up { after: Duration, polls: u32 },
    /// No carrier by the deadline (`timeout`): waited this long (at least the timeout; a
    /// slow last poll may take it past).
    NoCarrier {
        timeout: Duration,
        waited: Duration,
        polls: u32,
    },
}

impl CarrierWait {
    /// The line the tool prints.
    pub fn line(&self, iface: &str) -> String {
        match self {
            CarrierWait::Up { after, polls } => format!(
                "{iface} carrier after {:.1} s ({polls} polls)",
                after.as_secs_f64()
            ),
            CarrierWait::NoCarrier {
                timeout,
                waited,
                polls,
            } => format!(
                "no carrier after {} s ({iface}, {:.1} s by the clock, {polls} polls)",
                timeout.as_secs(),
                waited.as_secs_f64()
            ),
        }
    }
}

/// Reads `/sys/class/net/<iface>/carrier`: `Some(true)` for "1"; `Some(false)` for "0" or
/// an interface that is down (the kernel refuses the read); `None` if there is no such
/// interface.
pub fn read_carrier(iface: &str) -> Option<bool> {
    let dir = std::path::Path::new("/sys/class/net").join(iface);
    if !dir.exists() {
        return None;
    }
    match std::fs::read_to_string(dir.join("carrier")) {
        Ok(s) => Some(s.trim() == "1"),
        Err(_) => Some(false),
    }
}

/// Polls `up` every `interval` until it says true or `timeout` has passed on `now` (a
/// monotonic clock, read before each poll). A slow poll shortens the wait in polls, never
/// lengthens it past the first poll at or after the deadline.
pub fn wait_for_carrier(
    timeout: Duration,
    interval: Duration,
    mut now: impl FnMut() -> Duration,
    mut up: impl FnMut() -> bool,
    mut sleep: impl FnMut(Duration),
) -> CarrierWait {
    let start = now();
    let mut polls = 0u32;
    loop {
        polls = polls.saturating_add(1);
        let is_up = up();
        let elapsed = now().saturating_sub(start);
        if is_up {
            return CarrierWait::Up {
                after: elapsed,
                polls,
            };
        }
        if elapsed >= timeout {
            return CarrierWait::NoCarrier {
                timeout,
                waited: elapsed,
                polls,
            };
        }
        sleep(interval.min(timeout - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A fake monotonic clock that polls and sleeps advance.
    struct Clock(Cell<Duration>);

    impl Clock {
        fn advance(&self, d: Duration) {
            self.0.set(self.0.get() + d);
        }
    }

    #[test]
    fn slow_polls_end_the_wait_at_the_deadline_not_after_a_number_of_polls() {
        // Each poll costs 1 s (two process starts in a nested guest on a loaded machine).
        let clock = Clock(Cell::new(Duration::from_secs(1000)));
        let r = wait_for_carrier(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || clock.0.get(),
            || {
                clock.advance(Duration::from_secs(1));
                false
            },
            |d| clock.advance(d),
        );
        let CarrierWait::NoCarrier { waited, polls, .. } = r.clone() else {
            panic!("{r:?}");
        };
        assert!(waited >= Duration::from_secs(30), "{waited:?}");
        assert!(waited < Duration::from_secs(32), "{waited:?}");
        assert!(polls <= 30, "{polls} polls");
        assert!(r.line("eth0").starts_with("no carrier after 30 s (eth0, "));
    }

    #[test]
    fn fast_polls_still_wait_the_whole_timeout() {
        let clock = Clock(Cell::new(Duration::ZERO));
        let r = wait_for_carrier(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || clock.0.get(),
            || false,
            |d| clock.advance(d),
        );
        assert_eq!(
            r,
            CarrierWait::NoCarrier {
                timeout: Duration::from_secs(30),
                waited: Duration::from_secs(30),
                polls: 151
            }
        );
    }

    #[test]
    fn a_carrier_ends_the_wait_when_it_comes() {
        let clock = Clock(Cell::new(Duration::ZERO));
        let mut n = 0;
        let r = wait_for_carrier(
            Duration::from_secs(30),
            Duration::from_millis(200),
            || clock.0.get(),
            || {
                n += 1;
                n == 4
            },
            |d| clock.advance(d),
        );
        assert_eq!(
            r,
            CarrierWait::Up {
                after: Duration::from_millis(600),
                polls: 4
            }
        );
        assert_eq!(r.line("eth0"), "eth0 carrier after 0.6 s (4 polls)");
    }

    #[test]
    fn a_missing_interface_reads_as_none() {
        assert_eq!(read_carrier("bh-no-such-if0"), None);
    }
}
