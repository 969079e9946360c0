//! Service output: each service's stdout and stderr go to one pipe; init reads it without
//! blocking and re-emits each line as `<name>: <line>` on the console. Lines are bounded
//! (a longer line is cut into pieces) and each wakeup reads a bounded amount, so a chatty
//! child can neither grow init's memory nor starve the event loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Longest line re-emitted in one piece.
pub const MAX_LINE: usize = 1024;

/// Most bytes read from one pipe per wakeup.
pub const MAX_READ_PER_WAKEUP: usize = 16 * 1024;

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
}

impl LineBuffer {
    /// An empty buffer for lines up to `max` bytes (at least 1).
    pub fn new(max: usize) -> Self {
        LineBuffer {
            buf: Vec::new(),
            max: max.max(1),
        }
    }

    /// Feeds bytes; calls `emit` for each complete line (without its newline) and for each
    /// `max`-byte piece of an over-long line.
    pub fn push(&mut self, data: &[u8], emit: &mut dyn FnMut(&[u8])) {
        for &b in data {
            if b == b'\n' {
                emit(&self.buf);
                self.buf.clear();
            } else {
                self.buf.push(b);
                if self.buf.len() >= self.max {
                    emit(&self.buf);
                    self.buf.clear();
                }
            }
        }
    }

    /// Emits what is left (a last line without a newline).
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(&self.buf);
            self.buf.clear();
        }
    }
}

/// The read end of one service's output pipe.
#[derive(Debug)]
pub struct OutputPipe {
    file: File,
    lines: LineBuffer,
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainResult {
    /// More may come later.
    Open,
    /// Every writer has closed: the pipe can be dropped.
    Eof,
}

impl OutputPipe {
    /// Wraps a non-blocking read end.
    pub fn new(read_end: OwnedFd) -> Self {
        OutputPipe {
            file: File::from(read_end),
            lines: LineBuffer::new(MAX_LINE),
        }
    }

    /// A new pipe: its non-blocking read end as an `OutputPipe`, and the write end (blocking,
    /// close-on-exec) to give a child as its stdout and stderr.
    pub fn open() -> nix::Result<(OutputPipe, OwnedFd)> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let flags = OFlag::from_bits_retain(fcntl(&read_end, FcntlArg::F_GETFL)?);
        fcntl(&read_end, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok((OutputPipe::new(read_end), write_end))
    }

    /// Reads what is available (at most `MAX_READ_PER_WAKEUP` bytes) and emits full lines.
    /// At EOF, a last partial line is emitted too.
    pub fn drain(&mut self, emit: &mut dyn FnMut(&[u8])) -> DrainResult {
        let mut chunk = [0u8; 4096];
        let mut total = 0;
        while total < MAX_READ_PER_WAKEUP {
            match self.file.read(&mut chunk) {
                Ok(0) => {
                    self.lines.flush(emit);
                    return DrainResult::Eof;
                }
                Ok(n) => {
                    total += n;
                    self.lines.push(chunk.get(..n).unwrap_or_default(), emit);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return DrainResult::Open,
                Err(_) => {
                    self.lines.flush(emit);
                    return DrainResult::Eof;
                }
            }
        }
        DrainResult::Open
    }
}

impl AsFd for OutputPipe {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut lb = LineBuffer::new(max);
        for c in chunks {
            lb.push(c, &mut |l| {
                out.push(String::from_utf8_lossy(l).into_owned())
            });
        }
        lb.flush(&mut |l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        assert_eq!(
            lines(100, &[b"hel", b"lo\nwor", b"ld\n\nlast"]),
            vec!["hello", "world", "", "last"]
        );
    }

    #[test]
    fn long_lines_are_cut() {
        assert_eq!(lines(4, &[b"abcdefghij\n"]), vec!["abcd", "efgh", "ij"]);
    }

    #[test]
    fn pipe_drain_is_bounded_and_non_blocking() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                .unwrap();
        let mut pipe = OutputPipe::new(r);
        let mut w = File::from(w);
        let mut got = Vec::new();
        assert_eq!(pipe.drain(&mut |l| got.push(l.to_vec())), DrainResult::Open);
        // Fill the pipe: more than one wakeup's worth.
        let line = [b'x'; 99];
        let mut written = 0;
        while written < 3 * MAX_READ_PER_WAKEUP {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
            written += 100;
        }
        assert_eq!(pipe.drain(&mut |l| got.push(l.to_vec())), DrainResult::Open);
        assert!(got.len() * 100 <= MAX_READ_PER_WAKEUP + 4096);
        drop(w);
        while pipe.drain(&mut |l| got.push(l.to_vec())) == DrainResult::Open {}
        assert_eq!(got.len() * 100, written);
        assert!(got.iter().all(|l| l.len() == 99));
    }
}
