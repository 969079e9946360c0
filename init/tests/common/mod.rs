//! The harness of the tests that run the real event loop, supervisor and control sockets as
//! `bulkhead-init supervise` (a child subreaper instead of PID 1) with real /bin/sh services.
//! Waits are for log lines, each with a generous deadline; nothing here depends on how fast
//! the machine is. Each test file uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The init binary under test.
pub const INIT: &str = env!("CARGO_BIN_EXE_bulkhead-init");
/// How long any one wait may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// `bulkhead-init supervise` running a system.toml, its stderr read line by line.
pub struct Init {
    pub child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    /// Holds system.toml and the sockets.
    pub dir: tempfile::TempDir,
    /// The root-only control socket.
    pub socket: PathBuf,
}

impl Init {
    /// Starts init on `system_toml`; with `read_socket`, also its read-only socket at
    /// `<dir>/ro/init.sock`.
    pub fn start(system_toml: &str, read_socket: bool) -> Init {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system.toml");
        std::fs::write(&system, system_toml).unwrap();
        let socket = dir.path().join("init.sock");
        let mut cmd = Command::new(INIT);
        cmd.arg("supervise")
            .arg("--system")
            .arg(&system)
            .arg("--socket")
            .arg(&socket)
            .arg("--loglevel")
            .arg("debug");
        if read_socket {
            cmd.arg("--read-socket")
                .arg(dir.path().join("ro/init.sock"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Init {
            child,
            lines: rx,
            seen: Vec::new(),
            dir,
            socket,
        }
    }

    /// Waits for a line containing `needle`; returns it.
    pub fn expect(&mut self, needle: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends `sig` to init.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit (it must, within the deadline) and returns its code.
    pub fn wait_exit(&mut self) -> i32 {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Collect the remaining output for later assertions.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < end,
                "init did not exit:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Init {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
