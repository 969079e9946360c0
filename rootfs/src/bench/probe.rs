//! What the L1 side of a benchmark reads about a VMM process and the host it runs on:
//! resident memory outside guest RAM (`/proc/<pid>/smaps`), the host kernel's memory counters
//! (`/proc/vmstat`), KVM's counters (debugfs), the CPU time and page faults of waited-for
//! children (`getrusage`), and CLOCK_MONOTONIC, which another process can compare with.
//! Used by `bulkhead-bench-vmm` inside the bench host.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// CLOCK_MONOTONIC now.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Resident KiB in `smaps` text outside guest RAM: any mapping at least 3/4 of `guest_bytes`
/// is taken to be guest RAM.
pub fn rss_outside_guest_kib(smaps: &str, guest_bytes: u64) -> u64 {
    let (mut total, mut in_guest, mut cur_is_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                cur_is_guest = hi.saturating_sub(lo) >= guest_bytes / 4 * 3;
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            total += kib;
            if cur_is_guest {
                in_guest += kib;
            }
        }
    }
    total - in_guest
}

/// [`rss_outside_guest_kib`] of a live process.
pub fn process_rss_outside_guest_kib(pid: u32, guest_bytes: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(rss_outside_guest_kib(&smaps, guest_bytes))
}

/// `name value` lines (`/proc/vmstat`) as a map.
pub fn parse_counters(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// The host kernel's memory counters now (empty if unreadable).
pub fn vmstat() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/vmstat")
        .map(|t| parse_counters(&t))
        .unwrap_or_default()
}

/// `after - before` for `key` (0 if either lacks it or the counter went back).
pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, key: &str) -> u64 {
    match (before.get(key), after.get(key)) {
        (Some(b), Some(a)) => a.saturating_sub(*b),
        _ => 0,
    }
}

/// Where KVM's debugfs counters are.
pub const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";

/// Mounts debugfs if KVM's counters are not visible yet. Returns whether they are now.
pub fn ensure_debugfs() -> bool {
    if Path::new(KVM_DEBUGFS).is_dir() {
        return true;
    }
    let _ = nix::mount::mount(
        Some("debugfs"),
        "/sys/kernel/debug",
        Some("debugfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    Path::new(KVM_DEBUGFS).is_dir()
}

/// KVM's counters summed over every live VM (the top-level files of its debugfs
/// directory: `exits`, `pf_fixed`, `pages_4k`, ...).
pub fn kvm_counters() -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(KVM_DEBUGFS) else {
        return out;
    };
    for e in dir.flatten() {
        if !e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        if let Ok(v) = std::fs::read_to_string(e.path()) {
            if let Ok(v) = v.trim().parse() {
                out.insert(e.file_name().to_string_lossy().into_owned(), v);
            }
        }
    }
    out
}

/// CPU time and page faults of the children this process has waited for, so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChildUsage {
    /// User + system CPU time.
    pub cpu: Duration,
    /// Minor page faults.
    pub minflt: u64,
    /// Major page faults.
    pub majflt: u64,
}

impl ChildUsage {
    /// Now (RUSAGE_CHILDREN).
    pub fn now() -> Self {
        use nix::sys::resource::{getrusage, UsageWho};
        let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) else {
            return Self::default();
        };
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_micros(
                u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000
                    + u64::try_from(t.tv_usec()).unwrap_or(0),
            )
        };
        Self {
            cpu: tv(u.user_time()) + tv(u.system_time()),
            minflt: u64::try_from(u.minor_page_faults()).unwrap_or(0),
            majflt: u64::try_from(u.major_page_faults()).unwrap_or(0),
        }
    }

    /// What was added since `before` (one child, if exactly one was waited for between).
    pub fn since(&self, before: &Self) -> Self {
        Self {
            cpu: self.cpu.saturating_sub(before.cpu),
            minflt: self.minflt.saturating_sub(before.minflt),
            majflt: self.majflt.saturating_sub(before.majflt),
        }
    }
}

/// Median and extremes of `v` (None if empty).
pub fn median_min_max(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let mid = if n == 0 {
        return None;
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((mid, v[0], v[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rss_leaves_out_the_guest_mapping() {
        let smaps = "\
55d0-55e0 r-xp 00000000 00:02 1 /bin/bulkhead-vmm
Size:                 64 kB
Rss:                  40 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               90000 kB
7ffd0000-7ffd2000 rw-p 00000000 00:00 0 [stack]
Rss:                   8 kB
";
        assert_eq!(rss_outside_guest_kib(smaps, 256 << 20), 48);
        // A guest of 1 GiB: the 256 MiB mapping is not guest RAM then.
        assert_eq!(rss_outside_guest_kib(smaps, 1 << 30), 90048);
    }

    #[test]
    fn counters_and_deltas() {
        let a = parse_counters("thp_fault_alloc 3\npgfault 100\nbad line x\n");
        let b = parse_counters("thp_fault_alloc 10\npgfault 90\n");
        assert_eq!(delta(&a, &b, "thp_fault_alloc"), 7);
        assert_eq!(delta(&a, &b, "pgfault"), 0);
        assert_eq!(delta(&a, &b, "missing"), 0);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_min_max(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(median_min_max(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(median_min_max(&[]), None);
    }
}
