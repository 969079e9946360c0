//! Running a host image under QEMU: the command line (TCG, `-cpu max` for nested SVM, with
//! `cx16` masked on QEMU < 8; q35 with an IOMMU and QEMU's `edu` device), a console reader
//! thread, waits with deadlines, QMP for the power button and ctrl-alt-del, and a verdict on
//! how the machine ended, taken from QEMU's own `SHUTDOWN` event and the emulated host
//! kernel's own lines (never from a line a nested VM's console relayed). Machines on one
//! build machine run one at a time (a lock file): two emulated hosts on two cores only slow
//! each other down. `bulkhead-rootfs boot`, the benches and the test harness all run
//! machines through this module.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;

mod config;
mod cpu;
mod lock;
mod qmp;
mod verdict;

pub use crate::efi::esp::Firmware;
pub use config::{grants_device, Disk, QemuConfig, DISPLAY_ID};
pub use cpu::{cpu_model, QemuVersion};
pub use qmp::Qmp;
pub use verdict::{
    host_kernel_message, is_emulator_crash, is_guest_crash, is_host_kernel_panic, ShutdownReason,
    EMULATOR_RERUNS, VMM_GUEST_CRASH_STATUS,
};

use lock::{machine_lock, ScratchDir};
use qmp::watch_events;

/// What the kernel prints when the machine powers off / restarts / panics.
pub const POWER_DOWN: &str = "reboot: Power down";
pub const RESTARTING: &str = "reboot: Restarting system";
pub const KERNEL_PANIC: &str = "Kernel panic";

/// How many console lines are kept for diagnostics.
const KEEP_LINES: usize = 400;

/// With `QemuConfig::net_hub`: the net VM's NIC (1af4:1041, alone behind a root port).
pub const NETVM_NIC: &str = "0000:02:00.0";
/// With `QemuConfig::net_hub`: the test peer's NIC, on the same QEMU hub.
pub const PEER_NIC: &str = "0000:00:12.0";

/// The lock file that makes machines on one build machine run one at a time
/// (`BULKHEAD_QEMU_LOCK` overrides the path).
pub const DEFAULT_LOCK_FILE: &str = "/tmp/bulkhead-qemu.lock";

/// The line `Machine::spawn` puts first on every console it shows: which QEMU, which CPU
/// model and why.
pub const FIRST_LINE_PREFIX: &str = "bulkhead-qemu:";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not start {program}: {source} (is qemu-system-x86 installed? run `bulkhead-rootfs provision`)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("kernel panic while waiting for {waiting_for:?}: {line}\n{context}")]
    Panic {
        waiting_for: String,
        line: String,
        context: String,
    },
    #[error("timed out after {secs:.0} s waiting for {waiting_for:?}\n{context}")]
    Timeout {
        waiting_for: String,
        secs: f64,
        context: String,
    },
    #[error("QEMU exited while waiting for {waiting_for:?}\n{context}")]
    Exited {
        waiting_for: String,
        context: String,
    },
    #[error("QMP: {0}")]
    Qmp(String),
}

/// How a machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off (`reboot: Power down`).
    PowerOff,
    /// The guest asked to restart (QEMU runs with `-no-reboot`, so it exits).
    Reboot,
    /// A kernel panic (the line).
    Panic(String),
    /// QEMU ended without any of the above (its exit status, if any).
    Other(Option<i32>),
}

/// A running QEMU. Dropping it kills QEMU.
pub struct Machine {
    child: Child,
    lines: Receiver<String>,
    recent: Arc<Mutex<VecDeque<String>>>,
    all: Vec<String>,
    command_line: String,
    qmp_path: Option<PathBuf>,
    exited: bool,
    shutdown: Arc<Mutex<Option<ShutdownReason>>>,
    events: Option<std::thread::JoinHandle<()>>,
    _scratch: ScratchDir,
    _lock: Option<Flock<File>>,
}

impl Machine {
    /// Starts QEMU (after any other machine on this build machine has ended). With `echo`,
    /// every console line is also printed on our stdout. The first line says which QEMU
    /// and CPU model run the machine.
    pub fn spawn(cfg: &QemuConfig, echo: bool) -> Result<Self, QemuError> {
        let lock = machine_lock(echo);
        let scratch = ScratchDir::new().map_err(|source| QemuError::Spawn {
            program: "a scratch directory for QMP".into(),
            source,
        })?;
        let events_sock = scratch.0.join("events.sock");
        let mut args = cfg.args();
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", events_sock.display()));
        let mut child = Command::new(&cfg.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| QemuError::Spawn {
                program: cfg.qemu.display().to_string(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(KEEP_LINES)));
        let first = format!(
            "{FIRST_LINE_PREFIX} QEMU {}, -cpu {} ({})",
            QemuVersion::of(&cfg.qemu)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "of unknown version".into()),
            cfg.cpu,
            cfg.cpu_reason
        );
        if echo {
            println!("{first}");
        }
        if let Ok(mut q) = recent.lock() {
            q.push_back(first.clone());
        }
        let _ = tx.send(first);
        let shutdown = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = mpsc::channel();
        let events = {
            let shutdown = Arc::clone(&shutdown);
            let recent = Arc::clone(&recent);
            std::thread::spawn(move || watch_events(events_sock, shutdown, recent, ready_tx))
        };
        // The event monitor is connected before the emulated host can have done anything
        // worth a verdict (its kernel takes seconds to boot).
        let _ = ready_rx.recv_timeout(Duration::from_secs(10));
        let mut readers: Vec<Box<dyn Read + Send>> = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(Box::new(out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(Box::new(err));
        }
        for (i, r) in readers.into_iter().enumerate() {
            let tx = tx.clone();
            let recent = Arc::clone(&recent);
            std::thread::spawn(move || {
                let mut r = BufReader::new(r);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .replace('\r', "");
                    let line = if i == 1 {
                        format!("[qemu] {line}")
                    } else {
                        line
                    };
                    if echo {
                        let mut so = std::io::stdout().lock();
                        let _ = writeln!(so, "{line}");
                        let _ = so.flush();
                    }
                    if let Ok(mut q) = recent.lock() {
                        if q.len() == KEEP_LINES {
                            q.pop_front();
                        }
                        q.push_back(line.clone());
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Self {
            child,
            lines: rx,
            recent,
            all: Vec::new(),
            command_line: cfg.command_line(),
            qmp_path: cfg.qmp.clone(),
            exited: false,
            shutdown,
            events: Some(events),
            _scratch: scratch,
            _lock: lock,
        })
    }

    /// The QEMU command line, for diagnostics.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Every console line received so far (by the waits).
    pub fn lines(&self) -> &[String] {
        &self.all
    }

    /// The command line and the last console lines, for failure messages.
    pub fn context(&self) -> String {
        let recent = self
            .recent
            .lock()
            .map(|q| q.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let tail: Vec<&String> = recent.iter().rev().take(60).rev().collect();
        let mut s = format!(
            "--- QEMU command line:\n{}\n--- last console lines:\n",
            self.command_line
        );
        for l in tail {
            s.push_str(l);
            s.push('\n');
        }
        s
    }

    /// Waits until a console line satisfies `pred`, failing at once on a panic of the
    /// emulated host's kernel (a nested VM's relayed panic is only a line).
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.all.push(line.clone());
                    if is_host_kernel_panic(&line) {
                        return Err(QemuError::Panic {
                            waiting_for: what.to_string(),
                            line,
                            context: self.context(),
                        });
                    }
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(QemuError::Timeout {
                        waiting_for: what.to_string(),
                        secs: timeout.as_secs_f64(),
                        context: self.context(),
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.reap();
                    return Err(QemuError::Exited {
                        waiting_for: what.to_string(),
                        context: self.context(),
                    });
                }
            }
        }
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, QemuError> {
        self.wait_until(needle, timeout, |l| l.contains(needle))
    }

    /// After QEMU exited: the reason its `SHUTDOWN` event gave, if it sent one (waits for
    /// the event monitor's thread, which ends at the socket's EOF).
    pub fn shutdown_reason(&mut self) -> Option<ShutdownReason> {
        if let Some(events) = self.events.take() {
            let _ = events.join();
        }
        self.shutdown.lock().ok().and_then(|s| s.clone())
    }

    /// Reads the console until QEMU exits and says how the machine ended: from QEMU's
    /// `SHUTDOWN` event (power-off or reset), a reset preceded by the host kernel's own
    /// panic line being a panic. Only if the event monitor could not be reached do the
    /// host kernel's own `reboot:` lines decide. A host kernel panic ends the wait at
    /// once (QEMU is killed).
    pub fn wait_end(&mut self, timeout: Duration) -> Result<Outcome, QemuError> {
        self.wait_end_watching(timeout, |_| {})
    }

    /// [`Machine::wait_end`], showing every console line to `watch` on the way.
    pub fn wait_end_watching(
        &mut self,
        timeout: Duration,
        mut watch: impl FnMut(&str),
    ) -> Result<Outcome, QemuError> {
        let mut saw = None;
        let res = self.wait_until("the machine to power off", timeout, |l| {
            watch(l);
            let msg = host_kernel_message(l);
            if msg.starts_with(POWER_DOWN) {
                saw = Some(Outcome::PowerOff);
            } else if msg.starts_with(RESTARTING) {
                saw = Some(Outcome::Reboot);
            }
            false
        });
        match res {
            Err(QemuError::Exited { .. }) => {
                let status = self.reap();
                if let Some(events) = self.events.take() {
                    // QEMU has exited: its monitor socket is at EOF, the thread ends.
                    let _ = events.join();
                }
                let event = self.shutdown.lock().ok().and_then(|s| s.clone());
                Ok(match event {
                    Some(ShutdownReason::GuestShutdown) => Outcome::PowerOff,
                    Some(ShutdownReason::GuestReset) => Outcome::Reboot,
                    Some(ShutdownReason::GuestPanic) => Outcome::Panic("guest-panic".into()),
                    Some(ShutdownReason::Other(_)) => Outcome::Other(status),
                    None => saw.unwrap_or(Outcome::Other(status)),
                })
            }
            Err(QemuError::Panic { line, .. }) => {
                self.kill();
                Ok(Outcome::Panic(line))
            }
            Err(e) => {
                self.kill();
                Err(e)
            }
            Ok(_) => unreachable_outcome(),
        }
    }

    fn reap(&mut self) -> Option<i32> {
        if self.exited {
            return None;
        }
        match self.child.wait() {
            Ok(s) => {
                self.exited = true;
                s.code()
            }
            Err(_) => None,
        }
    }

    /// Kills QEMU now.
    pub fn kill(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }

    /// Connects to the machine's QMP socket.
    pub fn qmp(&self) -> Result<Qmp, QemuError> {
        let path = self
            .qmp_path
            .as_ref()
            .ok_or_else(|| QemuError::Qmp("this machine has no QMP socket".into()))?;
        Qmp::connect(path)
    }
}

// `wait_until` with an always-false predicate never returns Ok.
fn unreachable_outcome() -> Result<Outcome, QemuError> {
    Err(QemuError::Qmp(
        "internal: wait ended without a reason".into(),
    ))
}

impl Machine {
    /// Ends this machine (QEMU killed, the machine lock released) and starts `cfg` in its
    /// place: for a boot the emulator broke before any of our code ran. The new machine's
    /// lines start afresh.
    pub fn respawn(&mut self, cfg: &QemuConfig, echo: bool) -> Result<(), QemuError> {
        self.kill();
        self._lock = None;
        let fresh = Machine::spawn(cfg, echo)?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}
