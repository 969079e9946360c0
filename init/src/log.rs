//! Init's logger: every message goes to `/dev/console` as `<tag>: <msg>` and to
//! `/dev/kmsg` as `<N><tag>: <msg>` (one record per write, N from the level). The tag is
//! `bulkhead-init`, or what the program set with [`set_tag`] (the guest init's own).
//! Service output lines go to the console only, through a non-blocking descriptor, so a
//! slow console drops service lines instead of stalling PID 1.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
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

#[derive(Default)]
struct Sinks {
    console: Option<File>,
    kmsg: Option<File>,
    /// Non-blocking console for service output.
    output: Option<File>,
}

/// The `log` backend.
pub struct InitLogger {
    sinks: Mutex<Sinks>,
    dropped_lines: AtomicU64,
}

static LOGGER: InitLogger = InitLogger {
    sinks: Mutex::new(Sinks {
        console: None,
        kmsg: None,
        output: None,
    }),
    dropped_lines: AtomicU64::new(0),
};

/// Installs the logger at `level` and opens the console and kmsg (whatever exists now).
pub fn install(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
    reopen();
}

/// Installs the logger writing to stderr only (the non-PID-1 test mode).
pub fn install_stderr(level: LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Changes the level (after the command line is read).
pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}

fn open_write(path: &str, nonblocking: bool) -> Option<File> {
    let mut flags = libc::O_NOCTTY | libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    OpenOptions::new()
        .write(true)
        .custom_flags(flags)
        .open(path)
        .ok()
}

/// (Re)opens `/dev/console` and `/dev/kmsg`, e.g. after devtmpfs is mounted. Until the
/// console opens, messages go to stderr (the kernel's console on fd 2).
pub fn reopen() {
    let console = open_write("/dev/console", false);
    let output = open_write("/dev/console", true);
    let kmsg = open_write("/dev/kmsg", false);
    let mut sinks = LOGGER
        .sinks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if console.is_some() {
        sinks.console = console;
        sinks.output = output;
    }
    if kmsg.is_some() {
        sinks.kmsg = kmsg;
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

/// The kmsg record for a message: one line, bounded.
pub fn kmsg_record(level: Level, msg: &str) -> String {
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
    format!("<{}>{}: {one_line}\n", kmsg_priority(level), tag())
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
        let mut sinks = self
            .sinks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let line = console_line(&msg);
        match sinks.console.as_mut() {
            Some(c) => {
                let _ = c.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
        if let Some(k) = sinks.kmsg.as_mut() {
            let _ = k.write_all(kmsg_record(record.level(), &msg).as_bytes());
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
    let mut sinks = LOGGER
        .sinks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let ok = match sinks.output.as_mut() {
        Some(out) => out.write(&buf).is_ok_and(|n| n == buf.len()),
        None => std::io::stderr().write_all(&buf).is_ok(),
    };
    if !ok {
        LOGGER.dropped_lines.fetch_add(1, Ordering::Relaxed);
    }
}

/// Service output lines dropped so far because the console was busy.
pub fn dropped_lines() -> u64 {
    LOGGER.dropped_lines.load(Ordering::Relaxed)
}

/// Last-resort message (panic hook): opens fresh descriptors, takes no lock, so it works
/// even if the panic happened while the logger was held.
pub fn emergency(msg: &str) {
    let line = console_line(msg);
    match open_write("/dev/console", false) {
        Some(mut c) => {
            let _ = c.write_all(line.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
    if let Some(mut k) = open_write("/dev/kmsg", false) {
        let _ = k.write_all(kmsg_record(Level::Error, msg).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(console_line("ready"), "bulkhead-init: ready\n");
        assert_eq!(console_line("a\nb"), "bulkhead-init: a\nbulkhead-init: b\n");
        assert_eq!(
            kmsg_record(Level::Info, "ready"),
            "<6>bulkhead-init: ready\n"
        );
        assert_eq!(kmsg_record(Level::Error, "a\nb"), "<3>bulkhead-init: a b\n");
        let long = "é".repeat(1000);
        let rec = kmsg_record(Level::Warn, &long);
        assert!(rec.len() <= MAX_KMSG + 32);
        assert!(rec.starts_with("<4>bulkhead-init: é"));
    }
}
