//! Init's logger: every message goes to `/dev/console` as `<tag>: <msg>` and to
//! `/dev/kmsg` as `<N><tag>: <msg>` (one record per write, N from the level). The tag is
//! `bulkhead-init`, or what the program set with [`set_tag`] (the guest init's own).
//! Service output lines go to the console only.
//!
//! Every write to the console and to kmsg is non-blocking ([`ConsoleWriter`]): a console
//! that is slow or stopped (^S, `tcflow(TCOOFF)`, a serial line nobody reads) makes init
//! drop lines and count them, and the count is written out as soon as the console takes
//! lines again; it never holds up reaping, the control socket or shutdown. Records written
//! to kmsg are dropped the same way if the kernel refuses them (its rate limit).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The tag in front of every message, unless [`set_tag`] chose another.
pub const TAG: &str = "bulkhead-init";

static CHOSEN_TAG: OnceLock<&'static str> = OnceLock::new();

/// Chooses the tag once, before the first message (later calls are ignored).
pub fn set_tag(tag: &'static str) {
    let _ = CHOSEN_TAG.set(tag);
}

/// The tag in front of every message.
pub fn tag() -> &'static str {
    CHOSEN_TAG.get().copied().unwrap_or(TAG)
}

/// Longest message written to kmsg (the kernel caps a record near 1 KiB).
const MAX_KMSG: usize = 976;

/// Most bytes kept of a line the console took only in part (the rest goes out before
/// the next line; beyond this the line is cut).
const MAX_REST: usize = 8 * 1024;

/// How often a write that found the device busy is tried again before the line is
/// dropped, and the pause between tries: long enough for another writer's write to end
/// (at most 1 ms in all), far from a wait for a stopped console.
const BUSY_RETRIES: u32 = 4;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_micros(250);

/// What one non-blocking write attempt did.
enum Wrote {
    /// Everything went out.
    All,
    /// The device took part of it; the rest is kept.
    Part,
    /// Nothing went out (the device is busy, stopped, or failed).
    Nothing,
}

/// A console (or `/dev/kmsg`) that never blocks its writer. The descriptor is
/// non-blocking; a line the device cannot take now is dropped and counted, and the count
/// is written out, before the next line, once the device takes lines again. A line the
/// device took only in part is finished before any other line, so lines never interleave.
#[derive(Debug)]
pub struct ConsoleWriter {
    file: File,
    /// The unwritten tail of a line the device took only in part.
    rest: Vec<u8>,
    /// Lines dropped in all.
    dropped: u64,
    /// Of those, how many a report line has already announced.
    reported: u64,
    /// Whether a report line is written at all (not to kmsg, whose records are each a
    /// message of their own).
    report: bool,
}

impl ConsoleWriter {
    /// Wraps `file`, making its open file description non-blocking.
    pub fn new(file: File) -> std::io::Result<Self> {
        set_nonblocking(&file)?;
        Ok(ConsoleWriter {
            file,
            rest: Vec::new(),
            dropped: 0,
            reported: 0,
            report: true,
        })
    }

    /// Opens `path` for writing, non-blocking, without making it a controlling terminal.
    pub fn open(path: &Path) -> Option<Self> {
        open_write(path).and_then(|f| ConsoleWriter::new(f).ok())
    }

    /// Lines dropped so far because the device could not take them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn attempt(&mut self, buf: &[u8]) -> Wrote {
        let mut off = 0;
        let mut busy = 0;
        while off < buf.len() {
            let rest = buf.get(off..).unwrap_or_default();
            match self.file.write(rest) {
                Ok(0) => break,
                Ok(n) => off += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A tty answers EAGAIN at once to a non-blocking writer while another
                // process is in the middle of a write to it (its write lock), not only
                // when it is full or stopped: try again a few times before dropping, unless
                // lines are being dropped already (a stopped console costs one try a line).
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && busy < BUSY_RETRIES
                        && self.dropped == self.reported =>
                {
                    busy += 1;
                    std::thread::sleep(BUSY_PAUSE);
                }
                Err(_) => break,
            }
        }
        if off >= buf.len() {
            return Wrote::All;
        }
        if off == 0 {
            return Wrote::Nothing;
        }
        let rest = buf.get(off..).unwrap_or_default();
        self.rest.clear();
        if rest.len() > MAX_REST {
            self.rest
                .extend_from_slice(rest.get(..MAX_REST).unwrap_or_default());
            self.rest.extend_from_slice(" [cut]\n".as_bytes());
        } else {
            self.rest.extend_from_slice(rest);
        }
        Wrote::Part
    }

    /// Finishes a line the device took in part; true once nothing is left.
    fn flush_rest(&mut self) -> bool {
        if self.rest.is_empty() {
            return true;
        }
        let rest = std::mem::take(&mut self.rest);
        match self.attempt(&rest) {
            Wrote::All => true,
            Wrote::Part => false,
            Wrote::Nothing => {
                self.rest = rest;
                false
            }
        }
    }

    /// Writes `buf` (one or more whole lines, each ending in a newline) without blocking.
    /// Returns false if it was dropped.
    pub fn write_line(&mut self, buf: &[u8]) -> bool {
        if !self.flush_rest() {
            self.dropped += 1;
            return false;
        }
        if self.report && self.dropped > self.reported {
            let n = self.dropped - self.reported;
            let note = console_line(&format!(
                "console was busy: {n} lines dropped ({} in all)",
                self.dropped
            ));
            match self.attempt(note.as_bytes()) {
                Wrote::All => self.reported = self.dropped,
                Wrote::Part => {
                    self.reported = self.dropped;
                    self.dropped += 1;
                    return false;
                }
                Wrote::Nothing => {
                    self.dropped += 1;
                    return false;
                }
            }
        }
        match self.attempt(buf) {
            Wrote::All | Wrote::Part => true,
            Wrote::Nothing => {
                self.dropped += 1;
                false
            }
        }
    }
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

#[derive(Default)]
struct Sinks {
    /// The console: init's own lines and the services' output, never blocking.
    console: Option<ConsoleWriter>,
    /// `/dev/kmsg`, never blocking.
    kmsg: Option<ConsoleWriter>,
}

/// The `log` backend.
pub struct InitLogger {
    sinks: Mutex<Sinks>,
}

static LOGGER: InitLogger = InitLogger {
    sinks: Mutex::new(Sinks {
        console: None,
        kmsg: None,
    }),
};

fn sinks() -> std::sync::MutexGuard<'static, Sinks> {
    LOGGER
        .sinks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Installs the logger at `level` (PID 1): until [`reopen`] finds `/dev/console`, lines
/// go to the kernel's console on fd 2, made non-blocking like the rest.
pub fn install(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    let early = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| ConsoleWriter::new(File::from(fd)).ok());
    if let Some(early) = early {
        sinks().console = Some(early);
    }
    reopen();
}

/// Installs the logger writing to stderr only (the non-PID-1 test mode), blocking as any
/// command-line program does, unless [`use_console`] names a console.
pub fn install_stderr(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Writes everything to `path` as PID 1 writes to `/dev/console` (non-blocking, dropping
/// and counting what it cannot take); for `bulkhead-init supervise --console`.
pub fn use_console(path: &Path) -> std::io::Result<()> {
    let file = open_write(path).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("cannot open {}", path.display()),
        )
    })?;
    sinks().console = Some(ConsoleWriter::new(file)?);
    Ok(())
}

/// Changes the level (after the command line is read).
pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

fn open_write(path: &Path) -> Option<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()
}

/// (Re)opens `/dev/console` and `/dev/kmsg`, e.g. after devtmpfs is mounted. Until the
/// console opens, messages go to the kernel's console on fd 2. Drop counts carry over.
pub fn reopen() {
    let console = ConsoleWriter::open(Path::new("/dev/console"));
    let kmsg = ConsoleWriter::open(Path::new("/dev/kmsg")).map(|mut k| {
        k.report = false;
        k
    });
    let mut sinks = sinks();
    if let Some(mut console) = console {
        if let Some(old) = &sinks.console {
            console.dropped = old.dropped;
            console.reported = old.reported;
        }
        sinks.console = Some(console);
    }
    if let Some(level) = std::fs::read_to_string("/proc/sys/kernel/printk")
        .ok()
        .and_then(|t| parse_console_loglevel(&t))
    {
        CONSOLE_LOGLEVEL.store(level, Ordering::Relaxed);
    }
    if let Some(mut kmsg) = kmsg {
        if let Some(old) = &sinks.kmsg {
            kmsg.dropped = old.dropped;
        }
        sinks.kmsg = Some(kmsg);
    }
}

/// The kernel's console log level (`/proc/sys/kernel/printk`'s first field) as read when
/// kmsg was last (re)opened; 0 while not known.
static CONSOLE_LOGLEVEL: AtomicU8 = AtomicU8::new(0);

/// The console log level in `/proc/sys/kernel/printk`'s text (its first field): the kernel
/// prints a record on the console when the record's level is below it.
pub fn parse_console_loglevel(printk: &str) -> Option<u8> {
    printk.split_whitespace().next()?.parse().ok()
}

fn console_loglevel() -> Option<u8> {
    match CONSOLE_LOGLEVEL.load(Ordering::Relaxed) {
        0 => None,
        l => Some(l),
    }
}

/// kmsg priority of a level.
pub fn kmsg_priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The console lines for a message: every line of it carries the tag.
pub fn console_line(msg: &str) -> String {
    let tag = tag();
    let mut out = String::with_capacity(msg.len() + tag.len() + 3);
    for line in msg.split('\n') {
        out.push_str(tag);
        out.push_str(": ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The priority of init's kmsg copy of a message of `level`, when the kernel prints records
/// below `console_loglevel` on the console: never below that level. Init has written the
/// line to the console itself; a record the kernel printed too would be a second copy, and
/// the kernel writes to the serial port past the tty, in the middle of init's own line
/// (seen: `bulkhead-init: THE HUB HAS FAILE[   63.862139] bulkhead-init: THE HUB HAS
/// FAILED…`). So under `quiet` (4) an error is recorded at 4, with `loglevel=7` everything
/// at 7. A console that prints every level (8 and up: `ignore_loglevel`), or a level not
/// known, leaves the level as it is.
pub fn kmsg_priority_beside_console(level: Level, console_loglevel: Option<u8>) -> u8 {
    let priority = kmsg_priority(level);
    match console_loglevel {
        Some(console) if console <= 7 => priority.max(console),
        _ => priority,
    }
}

/// The kmsg record for a message: one line, bounded, at the priority
/// [`kmsg_priority_beside_console`] gives.
pub fn kmsg_record(level: Level, msg: &str, console_loglevel: Option<u8>) -> String {
    let mut one_line: String = msg
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if one_line.len() > MAX_KMSG {
        let mut cut = MAX_KMSG;
        while !one_line.is_char_boundary(cut) {
            cut -= 1;
        }
        one_line.truncate(cut);
    }
    format!(
        "<{}>{}: {one_line}\n",
        kmsg_priority_beside_console(level, console_loglevel),
        tag()
    )
}

impl Log for InitLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        let line = console_line(&msg);
        let mut sinks = sinks();
        match sinks.console.as_mut() {
            Some(c) => {
                c.write_line(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
        if let Some(k) = sinks.kmsg.as_mut() {
            k.write_line(kmsg_record(record.level(), &msg, console_loglevel()).as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Writes one line of a service's output to the console as `<name>: <line>`. Never blocks:
/// if the console cannot take it now, the line is dropped and counted.
pub fn service_line(name: &str, line: &[u8]) {
    let mut buf = Vec::with_capacity(name.len() + line.len() + 3);
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(line);
    buf.push(b'\n');
    let mut sinks = sinks();
    match sinks.console.as_mut() {
        Some(c) => {
            c.write_line(&buf);
        }
        None => {
            let _ = std::io::stderr().write_all(&buf);
        }
    }
}

/// Console lines (init's own and the services') dropped so far because the console was
/// busy or stopped.
pub fn dropped_lines() -> u64 {
    sinks().console.as_ref().map_or(0, ConsoleWriter::dropped)
}

/// Last-resort message (panic hook): opens fresh descriptors, takes no lock, so it works
/// even if the panic happened while the logger was held.
pub fn emergency(msg: &str) {
    let line = console_line(msg);
    match open_write(Path::new("/dev/console")) {
        Some(mut c) => {
            let _ = c.write(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write(line.as_bytes());
        }
    }
    if let Some(mut k) = open_write(Path::new("/dev/kmsg")) {
        let _ = k.write(kmsg_record(Level::Error, msg, console_loglevel()).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_does_not_print_inits_kmsg_copy_on_the_console_a_second_time() {
        // `quiet`: /proc/sys/kernel/printk reads "4\t4\t1\t7"; the kernel prints records
        // below 4. An error must not be one of them: init's console has the line already.
        let quiet = parse_console_loglevel("4\t4\t1\t7\n");
        assert_eq!(quiet, Some(4));
        assert_eq!(
            kmsg_record(Level::Error, "THE HUB HAS FAILED", quiet),
            "<4>bulkhead-init: THE HUB HAS FAILED\n"
        );
        for level in [Level::Error, Level::Warn, Level::Info, Level::Debug] {
            for console in 1..=7 {
                let p = kmsg_priority_beside_console(level, Some(console));
                assert!(p >= console, "{level} at {p} with console level {console}");
                assert!(
                    p >= kmsg_priority(level),
                    "never more severe than its own level"
                );
            }
        }
        // Levels the console would not print anyway keep their level.
        assert_eq!(kmsg_priority_beside_console(Level::Info, Some(4)), 6);
        // A console that prints everything, or one not known: the level as it is.
        assert_eq!(kmsg_priority_beside_console(Level::Error, Some(8)), 3);
        assert_eq!(kmsg_priority_beside_console(Level::Error, None), 3);
        assert_eq!(parse_console_loglevel(""), None);
    }

    #[test]
    fn formats() {
        assert_eq!(console_line("ready"), "bulkhead-init: ready\n");
        assert_eq!(console_line("a\nb"), "bulkhead-init: a\nbulkhead-init: b\n");
        assert_eq!(
            kmsg_record(Level::Info, "ready", None),
            "<6>bulkhead-init: ready\n"
        );
        assert_eq!(
            kmsg_record(Level::Error, "a\nb", None),
            "<3>bulkhead-init: a b\n"
        );
        let long = "é".repeat(1000);
        let rec = kmsg_record(Level::Warn, &long, None);
        assert!(rec.len() <= MAX_KMSG + 32);
        assert!(rec.starts_with("<4>bulkhead-init: é"));
    }

    /// A pty whose slave side is `ConsoleWriter`'s device: (master, slave kept open, the
    /// writer on the slave's path).
    fn pty() -> (File, std::os::fd::OwnedFd, ConsoleWriter) {
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
        ))
        .unwrap();
        let writer = ConsoleWriter::open(&path).unwrap();
        (File::from(pty.master), pty.slave, writer)
    }

    /// Reads what the master side has until `needle` has come (it must already be there).
    fn read_until(master: &mut File, needle: &str) -> String {
        use std::io::Read;
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        while !got.contains(needle) {
            let n = master.read(&mut buf).unwrap();
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        got
    }

    /// Runs `f` on a thread; fails the test (instead of hanging it) if it never returns.
    fn must_return<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("{what} blocked: the writer must never wait for the console")
            })
    }

    /// A console stopped with tcflow(TCOOFF) (what ^S does) takes nothing: every line is
    /// dropped at once, none blocks the writer, and once the console runs again the count
    /// comes out before the next line.
    #[test]
    fn a_stopped_console_never_blocks_and_the_drop_count_comes_out_later() {
        let (mut master, slave, mut writer) = pty();
        nix::sys::termios::tcflow(&slave, nix::sys::termios::FlowArg::TCOOFF).unwrap();
        let (writer, dropped) = must_return("writing to a stopped console", move || {
            let mut dropped = 0;
            for i in 0..10_000 {
                if !writer.write_line(console_line(&format!("line {i}")).as_bytes()) {
                    dropped += 1;
                }
            }
            (writer, dropped)
        });
        assert!(dropped > 0, "a stopped console took 10000 lines");
        assert_eq!(writer.dropped(), dropped);
        let mut writer = writer;
        nix::sys::termios::tcflow(&slave, nix::sys::termios::FlowArg::TCOON).unwrap();
        assert!(writer.write_line(console_line("after").as_bytes()));
        let got = read_until(&mut master, "bulkhead-init: after");
        let note =
            format!("bulkhead-init: console was busy: {dropped} lines dropped ({dropped} in all)");
        let at_note = got
            .find(&note)
            .unwrap_or_else(|| panic!("no {note:?} in {got:?}"));
        assert!(at_note < got.find("bulkhead-init: after").unwrap());
    }

    /// A console nobody reads fills up; lines it takes in part are finished before any
    /// other, so what comes out is whole lines only, and nothing blocks.
    #[test]
    fn a_full_console_gets_whole_lines_only() {
        let (mut master, _slave, writer) = pty();
        let line = format!("{}\n", "x".repeat(99));
        let mut writer = must_return("writing to a full console", move || {
            let mut writer = writer;
            let mut dropped = 0;
            while dropped < 100 {
                if !writer.write_line(line.as_bytes()) {
                    dropped += 1;
                }
            }
            writer
        });
        assert!(writer.dropped() >= 100);
        // Drain the console, then one more line goes out after the note.
        let mut reader = master.try_clone().unwrap();
        let drained = must_return("draining the console", move || {
            read_until(&mut reader, "\n")
        });
        let mut all = drained;
        loop {
            if writer.write_line(console_line("end").as_bytes()) {
                break;
            }
            let mut buf = [0u8; 4096];
            let n = std::io::Read::read(&mut master, &mut buf).unwrap();
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        all.push_str(&read_until(&mut master, "bulkhead-init: end"));
        for l in all.split('\n').map(|l| l.trim_end_matches('\r')) {
            assert!(
                l.is_empty()
                    || l == "x".repeat(99)
                    || l.starts_with("bulkhead-init: console was busy: ")
                    || l == "bulkhead-init: end",
                "a line came out mangled: {l:?}"
            );
        }
        assert!(all.contains("bulkhead-init: console was busy: "));
    }
}
