//! Where the guest's COM1 output goes, without ever holding up a vCPU: the UART (run on a
//! vCPU thread) puts bytes in a bounded queue ([`SerialOut`]) and a writer thread moves
//! them to the destination (stdout, a file, a pipe, a terminal) through [`LineOut`]. When
//! the destination does not take them (a pipe nobody reads, a stopped terminal) and the
//! queue is full, further bytes are dropped and counted; the writer thread logs how many
//! once it gets through again, and the VMM logs the total when the VM ends.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of guest output held for a slow destination before more are dropped.
pub const OUTPUT_QUEUE_BYTES: usize = 256 << 10;

/// Longest piece of one unterminated line held back.
const MAX_PENDING: usize = 4096;

/// The guest's console output, written a line at a time. vm-superio flushes after every
/// byte; written through as it comes, a reader of the pipe (the host init, which prefixes
/// each line with the VM's name) would see the VMM's own log lines land in the middle of a
/// guest line. `LineOut` ignores those flushes and writes whole lines (a longer one in
/// `MAX_PENDING` pieces); the rest of a last, unterminated line is written by
/// [`LineOut::finish`] (at VM end) or on drop. On a terminal (an interactive console, where
/// a prompt has no newline) output goes through byte by byte instead ([`LineOut::through`]).
pub struct LineOut {
    inner: Box<dyn Write + Send>,
    pending: Vec<u8>,
    whole_lines: bool,
}

impl LineOut {
    /// Whole lines (for pipes and files).
    pub fn lines(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            whole_lines: true,
        }
    }

    /// Every byte as it comes (for a terminal).
    pub fn through(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            whole_lines: false,
        }
    }

    /// Writes what is held back and flushes the destination.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let held = std::mem::take(&mut self.pending);
            self.inner.write_all(&held)?;
        }
        self.inner.flush()
    }
}

impl Write for LineOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.whole_lines {
            self.inner.write_all(buf)?;
            self.inner.flush()?;
            return Ok(buf.len());
        }
        self.pending.extend_from_slice(buf);
        // Up to the last complete line; everything if what would stay is too long.
        let mut cut = self
            .pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |nl| nl + 1);
        if self.pending.len() - cut >= MAX_PENDING {
            cut = self.pending.len();
        }
        if cut > 0 {
            let rest = self.pending.split_off(cut);
            let out = std::mem::replace(&mut self.pending, rest);
            self.inner.write_all(&out)?;
            self.inner.flush()?;
        }
        Ok(buf.len())
    }

    /// In line mode the UART's per-byte flushes are ignored: lines are written as they
    /// complete.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.whole_lines {
            return Ok(());
        }
        self.inner.flush()
    }
}

impl Drop for LineOut {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

struct Queue {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes dropped so far (queue full, or the destination failed).
    dropped: u64,
    /// Flushes asked for and done (generation numbers).
    flush_asked: u64,
    flush_done: u64,
    /// The UART side is gone: write what is left and end.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Bytes, a flush request or the close arrived.
    work: Condvar,
    /// A flush completed.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The UART's writer: a bounded queue that a thread drains into a [`LineOut`]. `write`
/// never blocks (it only takes the queue's short lock) and never fails: what does not fit
/// is dropped and counted ([`SerialOut::dropped`]).
pub struct SerialOut {
    shared: Arc<Shared>,
}

impl SerialOut {
    /// Whole lines to `inner` (a pipe or a file), through a queue of
    /// [`OUTPUT_QUEUE_BYTES`].
    pub fn lines(inner: Box<dyn Write + Send>) -> std::io::Result<Self> {
        Self::new(LineOut::lines(inner), OUTPUT_QUEUE_BYTES)
    }

    /// Every byte as it comes to `inner` (a terminal), through a queue of
    /// [`OUTPUT_QUEUE_BYTES`].
    pub fn through(inner: Box<dyn Write + Send>) -> std::io::Result<Self> {
        Self::new(LineOut::through(inner), OUTPUT_QUEUE_BYTES)
    }

    /// `out` behind a queue of `capacity` bytes, drained by a new thread (`serial-out`).
    pub fn new(out: LineOut, capacity: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                bytes: VecDeque::new(),
                capacity: capacity.max(1),
                dropped: 0,
                flush_asked: 0,
                flush_done: 0,
                closed: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let theirs = shared.clone();
        std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
                drain(&theirs, out)
            })?;
        Ok(Self { shared })
    }

    /// Bytes of guest output dropped so far because the destination did not take them.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }

    /// Waits at most `within` for everything queued to reach the destination, including a
    /// held-back unterminated line. True if it did. For the VM's end (never on a vCPU).
    pub fn flush_within(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut q = self.shared.lock();
        q.flush_asked = q.flush_asked.wrapping_add(1);
        let target = q.flush_asked;
        self.shared.work.notify_one();
        while q.flush_done != target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = match self.shared.done.wait_timeout(q, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

impl Write for SerialOut {
    /// Queues what fits; drops (and counts) the rest. Never blocks, never fails.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut q = self.shared.lock();
        let room = q.capacity.saturating_sub(q.bytes.len());
        let take = buf.len().min(room);
        q.bytes.extend(buf.iter().take(take));
        q.dropped = q.dropped.saturating_add((buf.len() - take) as u64);
        if take > 0 {
            self.shared.work.notify_one();
        }
        Ok(buf.len())
    }

    /// The UART flushes after every byte: nothing to do here (the writer thread writes as
    /// bytes arrive; `LineOut` decides when).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for SerialOut {
    /// The writer thread writes what is queued and ends; nobody waits for it.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.work.notify_one();
    }
}

/// The writer thread: moves queued bytes to `out` (blocking there if it must), finishes a
/// held-back line when a flush is asked for, and logs the bytes dropped since its last
/// report each time it gets a chunk through.
fn drain(shared: &Shared, mut out: LineOut) {
    let mut reported = 0u64;
    let mut failed = false;
    loop {
        let (chunk, flush, closed) = {
            let mut q = shared.lock();
            while q.bytes.is_empty() && q.flush_asked == q.flush_done && !q.closed {
                q = match shared.work.wait(q) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            let chunk: Vec<u8> = q.bytes.drain(..).collect();
            let flush = (q.flush_asked != q.flush_done).then_some(q.flush_asked);
            (chunk, flush, q.closed)
        };
        let mut lost = 0u64;
        if !chunk.is_empty() {
            if let Err(e) = out.write_all(&chunk) {
                lost = chunk.len() as u64;
                if !failed {
                    log::warn!("bulkhead-vmm: serial output: {e}; guest output is dropped");
                    failed = true;
                }
            }
        }
        if flush.is_some() || closed {
            let _ = out.finish();
        }
        let mut q = shared.lock();
        q.dropped = q.dropped.saturating_add(lost);
        let dropped = q.dropped;
        if let Some(f) = flush {
            q.flush_done = f;
            shared.done.notify_all();
        }
        let end = q.closed && q.bytes.is_empty();
        drop(q);
        if dropped > reported {
            log::warn!(
                "bulkhead-vmm: serial: {} bytes of guest output dropped ({dropped} in all): its destination is not taking them",
                dropped - reported
            );
            reported = dropped;
        }
        if end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// Each write reaches the destination as whole lines, however the UART feeds bytes,
    /// so another writer to the same pipe cannot land in the middle of a line.
    #[test]
    fn lines_are_written_whole_and_long_ones_in_pieces() {
        #[derive(Clone, Default)]
        struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Writes {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w = Writes::default();
        let mut out = LineOut::lines(Box::new(w.clone()));
        for b in b"one\ntwo\nthr" {
            out.write_all(&[*b]).unwrap();
            out.flush().unwrap();
        }
        assert_eq!(
            *w.0.lock().unwrap(),
            vec![b"one\n".to_vec(), b"two\n".to_vec()]
        );
        out.write_all(&vec![b'x'; MAX_PENDING]).unwrap();
        assert_eq!(w.0.lock().unwrap().len(), 3);
        assert_eq!(w.0.lock().unwrap()[2].len(), MAX_PENDING + 3);
        out.write_all(b"tail").unwrap();
        drop(out);
        assert_eq!(w.0.lock().unwrap()[3], b"tail".to_vec());
    }

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: room for two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: two new fds owned by nothing else.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]).into(),
                OwnedFd::from_raw_fd(fds[1]).into(),
            )
        }
    }

    /// A destination that takes nothing (a pipe nobody reads) never blocks the writer (the
    /// UART on a vCPU): what does not fit in the queue is dropped and counted, and output
    /// flows again once the destination reads.
    #[test]
    fn a_destination_that_takes_nothing_never_blocks_the_writer_and_drops_are_counted() {
        let (mut r, w) = pipe();
        let mut out = SerialOut::new(LineOut::lines(Box::new(w)), 16 << 10).unwrap();
        let line = [b'x'; 127];
        for _ in 0..(1 << 20) / 128 {
            out.write_all(&line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        let dropped = out.dropped();
        assert!(
            dropped > 0,
            "1 MiB cannot fit a 64 KiB pipe and a 16 KiB queue"
        );
        assert!(dropped <= 1 << 20);
        // Once the destination reads, the queued output goes through, and so does later
        // output.
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            r.read_to_end(&mut all).unwrap();
            all
        });
        assert!(out.flush_within(Duration::from_secs(20)));
        out.write_all(b"end\n").unwrap();
        assert!(out.flush_within(Duration::from_secs(20)));
        assert_eq!(out.dropped(), dropped);
        drop(out);
        let seen = reader.join().unwrap();
        assert_eq!(seen.len() as u64 + dropped, (1 << 20) + 4);
        assert!(seen.ends_with(b"end\n"));
        assert!(seen
            .iter()
            .all(|b| *b == b'x' || *b == b'\n' || b"end".contains(b)));
    }
}
