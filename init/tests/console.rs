//! Init's console never holds it up: `bulkhead-init supervise --console <pty>` logs to a
//! real pseudo-terminal exactly as PID 1 logs to /dev/console, and the test stops that
//! terminal with tcflow(TCOOFF), which is what ^S does on a serial console. While it is
//! stopped, init keeps reaping and restarting a crashing service, answers its control
//! socket and shuts down; once it runs again, init says how many lines it dropped.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use bulkhead_init::control::{request, Request, Response, ServiceStatus};
use nix::sys::termios::{tcflow, FlowArg};

const BIN: &str = env!("CARGO_BIN_EXE_bulkhead-init");
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `f` on a thread; fails the test, instead of hanging it, if `f` never returns.
fn must_return<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{what}: no answer within {DEADLINE:?}; init is stuck"))
}

fn status(socket: &Path) -> Vec<ServiceStatus> {
    let socket = socket.to_path_buf();
    match must_return("status over the control socket", move || {
        request(&socket, &Request::Status)
    }) {
        Ok(Response::Status { services }) => services,
        other => panic!("status: {other:?}"),
    }
}

/// Asks for status until `name` has been started `more` more times (init reaps and
/// restarts it meanwhile).
fn wait_restarts(socket: &Path, name: &str, more: u32) {
    let first = starts(socket, name);
    let end = Instant::now() + DEADLINE;
    while starts(socket, name) < first + more {
        assert!(
            Instant::now() < end,
            "{name} was not restarted {more} times within {DEADLINE:?}"
        );
    }
}

fn starts(socket: &Path, name: &str) -> u32 {
    status(socket)
        .iter()
        .find(|s| s.name == name)
        .map_or(0, |s| s.starts)
}

/// Everything the terminal's master side shows, line by line.
fn console_lines(mut master: File) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut pending = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(i) = pending.find('\n') {
                let line = pending[..i].trim_end_matches('\r').to_string();
                pending.drain(..=i);
                if tx.send(line).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn expect_line(lines: &Receiver<String>, needle: &str) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(e) => panic!("no console line with {needle:?}: {e}"),
        }
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stopped_console_never_stops_init_reaping_answering_or_shutting_down() {
    let dir = tempfile::tempdir().unwrap();
    let system = dir.path().join("system.toml");
    std::fs::write(
        &system,
        r#"
[[service]]
name = "crashy"
exec = ["/bin/sh", "-c", "echo going down; exit 3"]
restart = "always"
restart_delay_ms = 10
restart_delay_max_ms = 10
burst = 1000000
burst_interval_ms = 1000
"#,
    )
    .unwrap();
    let socket = dir.path().join("init.sock");
    let pty = nix::pty::openpty(None, None).unwrap();
    let tty: PathBuf =
        std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let lines = console_lines(File::from(pty.master));
    let child = Command::new(BIN)
        .arg("supervise")
        .arg("--system")
        .arg(&system)
        .arg("--socket")
        .arg(&socket)
        .arg("--loglevel")
        .arg("debug")
        .arg("--console")
        .arg(&tty)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut init = Kill(child);
    expect_line(&lines, "bulkhead-init: started crashy pid");
    expect_line(&lines, "crashy: going down");

    // ^S: the terminal takes nothing more. Every crash and restart is three lines of init's
    // and one of the service's; every status request one more (debug).
    tcflow(&pty.slave, FlowArg::TCOOFF).unwrap();
    wait_restarts(&socket, "crashy", 50);

    // ^Q: the next line init writes is preceded by the count of those it dropped.
    tcflow(&pty.slave, FlowArg::TCOON).unwrap();
    status(&socket);
    let note = expect_line(&lines, "bulkhead-init: console was busy: ");
    let dropped: u64 = note
        .split("console was busy: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {note:?}"));
    assert!(
        dropped >= 50 * 3,
        "50 restarts while stopped, only {dropped} lines dropped: {note}"
    );

    // Stopped again, init still shuts down when asked.
    tcflow(&pty.slave, FlowArg::TCOOFF).unwrap();
    wait_restarts(&socket, "crashy", 5);
    let sock = socket.clone();
    let answer = must_return("poweroff over the control socket", move || {
        request(&sock, &Request::Poweroff)
    });
    assert!(matches!(answer, Ok(Response::Ok)), "{answer:?}");
    let status = must_return("init's exit", move || init.0.wait().map(|s| s.code()));
    assert_eq!(status.unwrap(), Some(0));
}
