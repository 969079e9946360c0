//! Closing many received fds at once (`close_range` over runs of consecutive numbers).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Closes every fd in `fds` (emptying it) with as few system calls as possible: each run of
/// consecutive fd numbers, two or more long, goes with one `close_range(2)`; the rest with
/// `close(2)`. Only the exact numbers held here are closed: a run is used only when every
/// number from its first to its last is one of these owned fds, so no other fd of the
/// process can be in the range. If `close_range` fails (an old kernel), the run is closed
/// one by one.
pub fn close_fds(fds: &mut Vec<OwnedFd>) {
    if fds.len() < 2 {
        fds.clear();
        return;
    }
    fds.sort_unstable_by_key(|f| f.as_raw_fd());
    let mut rest = std::mem::take(fds).into_iter().peekable();
    while let Some(first) = rest.next() {
        let lo = first.as_raw_fd();
        let mut run = vec![first];
        while let Some(next) = rest.next_if(|f| {
            run.last()
                .is_some_and(|l| l.as_raw_fd().checked_add(1) == Some(f.as_raw_fd()))
        }) {
            run.push(next);
        }
        if run.len() < 2 {
            continue; // dropped: close(2)
        }
        let hi = lo.saturating_add(i32::try_from(run.len() - 1).unwrap_or(0));
        // The numbers lo..=hi are exactly `run` (consecutive, distinct owned fds): give up
        // ownership, then close them in one call.
        let raws: Vec<RawFd> = run
            .into_iter()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
            .collect();
        let (Ok(first), Ok(last)) = (libc::c_uint::try_from(lo), libc::c_uint::try_from(hi)) else {
            close_raw(&raws);
            continue;
        };
        // SAFETY: every fd in first..=last is one this function owns (see above); no other
        // code holds these numbers, and none of them is used after this call.
        let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
        if r != 0 {
            close_raw(&raws);
        }
    }
}

fn close_raw(raws: &[RawFd]) {
    for &raw in raws {
        // SAFETY: `raw` was an OwnedFd whose ownership close_fds took over; it is closed
        // exactly once, here.
        unsafe { libc::close(raw) };
    }
}
