//! The fuzz target's body (`fuzz/`), also run over the committed seeds by the tests: a
//! stream of bytes is cut into messages and each is decoded and handled as a request or an
//! event by a client's state, with a stand-in transport. Whatever the bytes, the result is
//! a message, a protocol error or a compositor fault: never a panic.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::app::state::{ClientState, Out};
use crate::stats::Stats;
use crate::transport::standin::StandIn;
use crate::wire;

/// Runs `data` through the parser and a client's state. The first 4 bytes choose, bit by
/// bit (message `i` takes bit `i % 32`), whether each message is a request (0) or an event
/// (1); a few memfds stand for the fds that came with the stream. Returns how many
/// messages were handled before the end or the first error.
pub fn exercise(data: &[u8]) -> usize {
    let (Some(head), Some(mut rest)) = (data.get(..4), data.get(4..)) else {
        return 0;
    };
    let dirs = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut state = ClientState::new(Arc::new(StandIn::new()), Arc::new(Stats::default()));
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    for _ in 0..4 {
        if let Ok(f) = memfd() {
            fds.push_back(f);
        }
    }
    let mut i = 0u32;
    while let Ok(Some(h)) = wire::header(rest) {
        let Some(msg) = rest.get(..h.size) else {
            break;
        };
        let mut out: Vec<Out> = Vec::new();
        let r = if (dirs >> (i % 32)) & 1 == 0 {
            state.request(msg, &mut fds, &mut out)
        } else {
            state.event(msg, &mut fds, &mut out)
        };
        if r.is_err() {
            break;
        }
        rest = rest.get(h.size..).unwrap_or_default();
        i += 1;
    }
    i as usize
}

fn memfd() -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(64 * 1024)?;
    Ok(OwnedFd::from(f))
}

/// The GUI proxy's registry filter over arbitrary bytes: the first 4 bytes choose, bit by
/// bit, whether each chunk goes in as requests (0) or events (1); the rest is cut into
/// chunks whose lengths are the next byte each (so messages split anywhere). Whatever the
/// bytes, the result is forwarded bytes, a refusal or an error: never a panic. Returns the
/// bytes forwarded before the end or the first refusal or error.
pub fn exercise_gui_filter(data: &[u8]) -> usize {
    let (Some(head), Some(mut rest)) = (data.get(..4), data.get(4..)) else {
        return 0;
    };
    let dirs = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let mut filter = crate::gui::registry::RegistryFilter::new();
    let (mut i, mut forwarded) = (0u32, 0usize);
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        let r = if (dirs >> (i % 32)) & 1 == 0 {
            filter.requests(chunk).map_err(|_| ())
        } else {
            filter.events(chunk).map_err(|_| ())
        };
        match r {
            Ok(out) => forwarded += out.len(),
            Err(()) => break,
        }
        rest = next;
        i += 1;
    }
    forwarded
}
