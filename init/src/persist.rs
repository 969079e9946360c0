//! Logs that outlive the console: with `[log] dir` in system.toml, every line of every
//! service's output (and init's own lines about each service) is also written to
//! `<dir>/<service>.log`, rotated by size, and the file `[log] audit` names (the hub's
//! audit log) is copied to `<dir>/audit.jsonl` as it grows, rotated the same way.
//!
//! PID 1 never writes to a disk itself (a disk can stall; PID 1 must not): it hands each
//! line to a small child, `bulkhead-init logd` (s6-log's role), through a pipe it writes
//! without blocking. One record per `write(2)`, shorter than `PIPE_BUF`, so records never
//! interleave or tear; when the pipe is full the line is dropped and counted, and the
//! count is written into the log as soon as there is room again. The writer is a support
//! process like the hub: started first, stopped last, restarted if it dies (the pipe, which
//! init keeps both ends of, holds what arrives meanwhile). It mounts `[log] device` on the
//! directory first, if one is named.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// The log writer's name among the children.
pub const LOGD_NAME: &str = "logd";

/// Longest text of one record (service lines are at most `output::MAX_LINE`).
const MAX_TEXT: usize = 2048;

/// Init's end of the pipe to the log writer.
#[derive(Debug)]
pub struct Sink {
    pipe: File,
    dropped: u64,
}

/// A new pipe for the log writer: init's sink (non-blocking write end) and the read end to
/// hand the writer.
pub fn pipe() -> std::io::Result<(Sink, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let flags = OFlag::from_bits_retain(fcntl(&w, FcntlArg::F_GETFL)?);
    fcntl(&w, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // Room for bursts while the writer catches up (the kernel may refuse; then 64 KiB).
    // SAFETY: fcntl with integer arguments on a descriptor we own.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((
        Sink {
            pipe: File::from(w),
            dropped: 0,
        },
        r,
    ))
}

/// One record: `name \t boot_ms \t unix_ms \t I|O \t text \n`.
pub fn record(name: &str, from_init: bool, boot_ms: u64, unix_ms: u64, text: &[u8]) -> Vec<u8> {
    let text = text.get(..text.len().min(MAX_TEXT)).unwrap_or(text);
    let mut out = Vec::with_capacity(name.len() + text.len() + 48);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(
        format!(
            "\t{boot_ms}\t{unix_ms}\t{}\t",
            if from_init { 'I' } else { 'O' }
        )
        .as_bytes(),
    );
    out.extend(text.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
    out.push(b'\n');
    out
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The service (a file name: `[a-z0-9-]+`, else refused).
    pub name: String,
    /// Since boot.
    pub boot_ms: u64,
    /// Since the epoch.
    pub unix_ms: u64,
    /// Init's own line.
    pub from_init: bool,
    /// The text.
    pub text: Vec<u8>,
}

/// Parses one record line (without its newline); `None` if it is not one.
pub fn parse_record(line: &[u8]) -> Option<Record> {
    let mut parts = line.splitn(5, |&b| b == b'\t');
    let name = std::str::from_utf8(parts.next()?).ok()?;
    if !crate::config::valid_name(name) {
        return None;
    }
    let num = |p: &[u8]| std::str::from_utf8(p).ok()?.parse::<u64>().ok();
    let boot_ms = num(parts.next()?)?;
    let unix_ms = num(parts.next()?)?;
    let from_init = match parts.next()? {
        b"I" => true,
        b"O" => false,
        _ => return None,
    };
    Some(Record {
        name: name.to_string(),
        boot_ms,
        unix_ms,
        from_init,
        text: parts.next()?.to_vec(),
    })
}

impl Sink {
    /// Hands one line to the writer, or drops and counts it if the pipe is full.
    pub fn line(&mut self, name: &str, from_init: bool, boot_ms: u64, unix_ms: u64, text: &[u8]) {
        if self.dropped > 0 {
            let note = format!(
                "{} lines were dropped on the way to the log writer (it was busy)",
                self.dropped
            );
            let r = record(LOGD_NAME, true, boot_ms, unix_ms, note.as_bytes());
            if !self.write(&r) {
                self.dropped += 1;
                return;
            }
            self.dropped = 0;
        }
        if !self.write(&record(name, from_init, boot_ms, unix_ms, text)) {
            self.dropped += 1;
        }
    }

    fn write(&mut self, r: &[u8]) -> bool {
        // Shorter than PIPE_BUF: all or nothing.
        matches!(self.pipe.write(r), Ok(n) if n == r.len())
    }

    /// Lines dropped and not yet reported.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

// ── The writer (`bulkhead-init logd`) ───────────────────────────────────────────────────

/// What the writer is told.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Where the files go.
    pub dir: PathBuf,
    /// Mounted on `dir` first.
    pub device: Option<PathBuf>,
    /// Its filesystem.
    pub fstype: String,
    /// A file copied to `dir/audit.jsonl` as it grows.
    pub audit: Option<PathBuf>,
    /// Rotation size.
    pub max_bytes: u64,
    /// Rotated files kept.
    pub keep: u32,
}

/// One rotated log file.
#[derive(Debug)]
pub struct Rotating {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
    keep: u32,
}

impl Rotating {
    /// Opens (appends to) `path`.
    pub fn new(path: PathBuf, max: u64, keep: u32) -> Self {
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Rotating {
            path,
            file: None,
            size,
            max,
            keep,
        }
    }

    /// Appends `data` (whole lines), rotating first if it would pass the size.
    pub fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + data.len() as u64 > self.max {
            self.rotate()?;
        }
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        if let Some(f) = self.file.as_mut() {
            f.write_all(data)?;
        }
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    /// `x.log` → `x.log.1` → … → `x.log.<keep>`; the oldest goes.
    pub fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        if self.path.exists() {
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.size = 0;
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// A record as a line of its file: `<time> [<since boot>] [init] <text>`.
pub fn file_line(r: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.text.len() + 48);
    let stamp = if r.unix_ms >= 946_684_800_000 {
        rfc3339(r.unix_ms)
    } else {
        "-".to_string()
    };
    out.extend_from_slice(
        format!(
            "{stamp} [{:>5}.{:03}] {}",
            r.boot_ms / 1000,
            r.boot_ms % 1000,
            if r.from_init { "[init] " } else { "" }
        )
        .as_bytes(),
    );
    out.extend_from_slice(&r.text);
    out.push(b'\n');
    out
}

/// The writer: reads records from `input` until SIGTERM (then drains what is left) or
/// the end of the input, writes them, copies the audit log. Returns the exit status.
pub fn run_writer(cfg: &WriterConfig, input: OwnedFd) -> i32 {
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGINT);
    let sfd = mask
        .thread_block()
        .and_then(|_| SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC));
    let sfd = match sfd {
        Ok(s) => s,
        Err(e) => {
            eprintln!("logd: signalfd: {e}");
            return 1;
        }
    };
    if let Some(dev) = &cfg.device {
        if let Err(e) = std::fs::create_dir_all(&cfg.dir) {
            eprintln!("logd: {}: {e}", cfg.dir.display());
        }
        match nix::mount::mount(
            Some(dev.as_path()),
            cfg.dir.as_path(),
            Some(cfg.fstype.as_str()),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            None::<&str>,
        ) {
            Ok(()) => println!(
                "logd: mounted {} ({}) on {}",
                dev.display(),
                cfg.fstype,
                cfg.dir.display()
            ),
            Err(nix::errno::Errno::EBUSY) => {
                println!("logd: {} is mounted already", cfg.dir.display())
            }
            Err(e) => {
                eprintln!(
                    "logd: cannot mount {} on {}: {e}; writing to the directory as it is",
                    dev.display(),
                    cfg.dir.display()
                );
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(&cfg.dir) {
        eprintln!("logd: {}: {e}", cfg.dir.display());
        return 1;
    }
    println!("logd: writing the services' logs to {}", cfg.dir.display());
    let mut w = Writer {
        cfg: cfg.clone(),
        files: std::collections::BTreeMap::new(),
        partial: Vec::new(),
        audit_offset: 0,
        audit_partial: Vec::new(),
        audit_out: Rotating::new(cfg.dir.join("audit.jsonl"), cfg.max_bytes, cfg.keep),
    };
    let mut input = File::from(input);
    let mut stopping = false;
    loop {
        let (input_ready, sig_ready) = {
            let mut fds = [
                nix::poll::PollFd::new(input.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(sfd.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            let timeout = if stopping { 0u16 } else { 500 };
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(timeout));
            let ready = |f: &nix::poll::PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            let _ = sfd.read_signal();
            stopping = true;
            if let Err(e) = fcntl(&input, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)) {
                eprintln!("logd: {e}");
            }
        }
        let mut eof = false;
        if input_ready || stopping {
            let mut buf = [0u8; 16 * 1024];
            match input.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => w.input(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stopping {
                        eof = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("logd: read: {e}");
                    eof = true;
                }
            }
        }
        w.copy_audit();
        if eof {
            w.copy_audit();
            nix::unistd::sync();
            return 0;
        }
    }
}

struct Writer {
    cfg: WriterConfig,
    files: std::collections::BTreeMap<String, Rotating>,
    partial: Vec<u8>,
    audit_offset: u64,
    audit_partial: Vec<u8>,
    audit_out: Rotating,
}

impl Writer {
    fn input(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        let mut start = 0;
        while let Some(nl) = self
            .partial
            .get(start..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            let end = start + nl;
            if let Some(r) = self.partial.get(start..end).and_then(parse_record) {
                self.write(&r);
            }
            start = end + 1;
        }
        self.partial.drain(..start);
        if self.partial.len() > 2 * MAX_TEXT + 256 {
            self.partial.clear();
        }
    }

    fn write(&mut self, r: &Record) {
        if self.files.len() >= 512 && !self.files.contains_key(&r.name) {
            return;
        }
        let cfg = &self.cfg;
        let f = self.files.entry(r.name.clone()).or_insert_with(|| {
            Rotating::new(
                cfg.dir.join(format!("{}.log", r.name)),
                cfg.max_bytes,
                cfg.keep,
            )
        });
        if let Err(e) = f.append(&file_line(r)) {
            eprintln!("logd: {}: {e}", r.name);
        }
    }

    /// Copies what the audit log gained since the last look (whole lines; a file that
    /// shrank was replaced: copied from its start).
    fn copy_audit(&mut self) {
        let Some(path) = self.cfg.audit.clone() else {
            return;
        };
        let Ok(mut f) = File::open(&path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.audit_offset {
            self.audit_offset = 0;
            self.audit_partial.clear();
        }
        if len == self.audit_offset {
            return;
        }
        use std::io::Seek;
        if f.seek(std::io::SeekFrom::Start(self.audit_offset)).is_err() {
            return;
        }
        let mut buf = vec![0u8; 256 * 1024];
        let n = f.read(&mut buf).unwrap_or(0);
        self.audit_offset += n as u64;
        self.audit_partial
            .extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(last) = self.audit_partial.iter().rposition(|&b| b == b'\n') {
            let whole: Vec<u8> = self.audit_partial.drain(..=last).collect();
            if let Err(e) = self.audit_out.append(&whole) {
                eprintln!("logd: audit: {e}");
            }
        }
    }
}

/// How long the writer waits between looks at the audit log.
pub const AUDIT_POLL: Duration = Duration::from_millis(500);

/// The writer's command line for a system's `[log]`.
pub fn writer_args(log: &crate::config::LogConfig, dir: &Path) -> Vec<String> {
    let mut a = vec![
        "logd".to_string(),
        "--dir".to_string(),
        dir.display().to_string(),
        "--max-bytes".to_string(),
        log.max_file_bytes().to_string(),
        "--keep".to_string(),
        log.keep_files.to_string(),
    ];
    if let Some(d) = &log.device {
        a.extend(["--device".to_string(), d.display().to_string()]);
        a.extend([
            "--fstype".to_string(),
            log.fstype.clone().unwrap_or_else(|| "ext4".into()),
        ]);
    }
    if let Some(p) = &log.audit {
        a.extend(["--audit".to_string(), p.display().to_string()]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_odd_names() {
        let r = record("vm-a", true, 1234, 1_700_000_000_123, b"hello\tworld\nx");
        assert!(r.len() < 4096);
        let back = parse_record(r.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(back.name, "vm-a");
        assert_eq!(
            (back.boot_ms, back.unix_ms, back.from_init),
            (1234, 1_700_000_000_123, true)
        );
        assert_eq!(back.text, b"hello\tworld x");
        assert!(parse_record(b"../etc\t1\t2\tO\tx").is_none());
        assert!(parse_record(b"a\tx\t2\tO\tx").is_none());
        assert!(parse_record(b"a\t1\t2\tZ\tx").is_none());
        // A record of the longest text still fits in PIPE_BUF.
        assert!(record(&"a".repeat(64), false, u64::MAX, u64::MAX, &[b'x'; 10_000]).len() < 4096);
    }

    #[test]
    fn time_stamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let line = file_line(&Record {
            name: "x".into(),
            boot_ms: 12_345,
            unix_ms: 0,
            from_init: true,
            text: b"started".to_vec(),
        });
        assert_eq!(line, b"- [   12.345] [init] started\n");
    }

    #[test]
    fn files_rotate_by_size_and_keep_so_many() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Rotating::new(dir.path().join("a.log"), 100, 2);
        for i in 0..10 {
            f.append(format!("{i:039}\n").as_bytes()).unwrap();
        }
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
        assert_eq!(read("a.log").lines().count(), 2);
        assert_eq!(read("a.log.1").lines().count(), 2);
        assert_eq!(read("a.log.2").lines().count(), 2);
        assert!(!dir.path().join("a.log.3").exists());
        assert!(read("a.log").contains(&format!("{:039}", 9)));
        assert!(std::fs::metadata(dir.path().join("a.log")).unwrap().len() <= 100);
    }

    /// The sink never blocks: with the writer asleep, lines past the pipe's room are
    /// dropped and counted, and the count reaches the log once there is room.
    #[test]
    fn a_full_pipe_drops_and_counts_then_reports() {
        let (mut sink, r) = pipe().unwrap();
        let mut n = 0u64;
        while sink.dropped() == 0 {
            sink.line("svc", false, 0, 0, &[b'x'; 1000]);
            n += 1;
            assert!(n < 100_000, "the pipe never filled");
        }
        sink.line("svc", false, 0, 0, b"lost too");
        assert_eq!(sink.dropped(), 2);
        // The writer reads everything there is.
        let mut input = File::from(r);
        let flags = OFlag::from_bits_retain(fcntl(&input, FcntlArg::F_GETFL).unwrap());
        fcntl(&input, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        while input.read(&mut buf).is_ok_and(|k| k > 0) {}
        sink.line("svc", false, 0, 0, b"back");
        assert_eq!(sink.dropped(), 0);
        let k = input.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..k]);
        assert!(text.contains("2 lines were dropped"), "{text}");
        assert!(text.contains("\tback\n"), "{text}");
    }
}
