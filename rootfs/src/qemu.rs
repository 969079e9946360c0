//! Running a host image under QEMU: the command line (TCG, `-cpu max` for nested SVM, q35
//! with an IOMMU and QEMU's `edu` device), a console reader thread, waits with deadlines,
//! QMP for the power button and ctrl-alt-del, and a verdict on how the machine ended.
//! `bulkhead-rootfs boot` and the test harness both run machines through this module.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the kernel prints when the machine powers off / restarts / panics.
pub const POWER_DOWN: &str = "reboot: Power down";
pub const RESTARTING: &str = "reboot: Restarting system";
pub const KERNEL_PANIC: &str = "Kernel panic";

/// How many console lines are kept for diagnostics.
const KEEP_LINES: usize = 400;

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

/// A QEMU machine description.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub smp: u32,
    /// q35 with `intel-iommu`, one `edu` device (00:03.0) and a `virtio-rng-pci` behind a
    /// PCIe root port (01:00.0: MSI-X, FLR).
    pub iommu_and_edu: bool,
    /// A second serial port (the guest's ttyS1) written to this file.
    pub second_serial: Option<PathBuf>,
    /// A QMP socket.
    pub qmp: Option<PathBuf>,
    /// Extra raw arguments.
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// The default Bulkhead host machine: 2 vCPUs, 2 GiB, q35 + intel-iommu + edu.
    pub fn host(kernel: &Path, initrd: &Path, append: &str) -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
            memory_mib: 2048,
            smp: 2,
            iommu_and_edu: true,
            second_serial: None,
            qmp: None,
            extra: Vec::new(),
        }
    }

    /// The arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            self.smp.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
        ];
        if self.iommu_and_edu {
            a.extend(
                [
                    "-machine",
                    "q35",
                    "-device",
                    "intel-iommu,intremap=on",
                    "-device",
                    "edu,addr=03.0",
                    // A device with MSI-X and a function reset (FLR), alone behind a PCIe
                    // root port (its own IOMMU group, bus 1): 0000:01:00.0 in the guest.
                    // iommu_platform=on: without it QEMU's virtio devices DMA to physical
                    // addresses, bypassing intel-iommu (and a VM's IOVAs).
                    "-device",
                    "pcie-root-port,id=rp1,chassis=1,addr=10.0",
                    "-device",
                    "virtio-rng-pci,bus=rp1,addr=00.0,iommu_platform=on",
                ]
                .map(String::from),
            );
        }
        a.extend(
            [
                "-display",
                "none",
                "-vga",
                "none",
                "-nic",
                "none",
                "-monitor",
                "none",
                "-no-reboot",
                "-serial",
                "stdio",
            ]
            .map(String::from),
        );
        if let Some(p) = &self.second_serial {
            a.push("-serial".into());
            a.push(format!("file:{}", p.display()));
        }
        if let Some(p) = &self.qmp {
            a.push("-qmp".into());
            a.push(format!("unix:{},server=on,wait=off", p.display()));
        }
        a.extend([
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.append.clone(),
        ]);
        a.extend(self.extra.iter().cloned());
        a
    }

    /// The command line as a shell would show it.
    pub fn command_line(&self) -> String {
        let mut s = self.qemu.display().to_string();
        for a in self.args() {
            s.push(' ');
            if a.contains(' ') {
                s.push('\'');
                s.push_str(&a);
                s.push('\'');
            } else {
                s.push_str(&a);
            }
        }
        s
    }
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
}

impl Machine {
    /// Starts QEMU. With `echo`, every console line is also printed on our stdout.
    pub fn spawn(cfg: &QemuConfig, echo: bool) -> Result<Self, QemuError> {
        let mut child = Command::new(&cfg.qemu)
            .args(cfg.args())
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

    /// Waits until a console line satisfies `pred`, failing at once on a kernel panic.
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
                    if line.contains(KERNEL_PANIC) {
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

    /// Reads the console until QEMU exits and says how the machine ended. A kernel panic
    /// ends the wait at once (QEMU is killed).
    pub fn wait_end(&mut self, timeout: Duration) -> Result<Outcome, QemuError> {
        let mut saw = None;
        let res = self.wait_until("the machine to power off", timeout, |l| {
            if l.contains(POWER_DOWN) {
                saw = Some(Outcome::PowerOff);
            } else if l.contains(RESTARTING) {
                saw = Some(Outcome::Reboot);
            }
            false
        });
        match res {
            Err(QemuError::Exited { .. }) => {
                let status = self.reap();
                Ok(saw.unwrap_or(Outcome::Other(status)))
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

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A QMP connection (QEMU's JSON machine protocol).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities. Retries briefly while QEMU creates the socket.
    pub fn connect(path: &Path) -> Result<Self, QemuError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    log::debug!("QMP not ready yet: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(QemuError::Qmp(format!("{}: {e}", path.display()))),
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let writer = stream
            .try_clone()
            .map_err(|e| QemuError::Qmp(e.to_string()))?;
        let mut q = Self {
            reader: BufReader::new(stream),
            writer,
        };
        q.read_message()?; // greeting
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<serde_json::Value, QemuError> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| QemuError::Qmp(e.to_string()))?;
        serde_json::from_str(&line).map_err(|e| QemuError::Qmp(format!("{e}: {line:?}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QemuError> {
        let mut msg = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| QemuError::Qmp(e.to_string()))?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QemuError::Qmp(format!("{command}: {e}")));
            }
            // Asynchronous events are skipped.
        }
    }

    /// Presses ctrl-alt-delete on the machine's keyboard.
    pub fn ctrl_alt_delete(&mut self) -> Result<(), QemuError> {
        let keys: Vec<serde_json::Value> = ["ctrl", "alt", "delete"]
            .iter()
            .map(|k| serde_json::json!({"type": "qcode", "data": k}))
            .collect();
        self.execute("send-key", Some(serde_json::json!({ "keys": keys })))
            .map(|_| ())
    }

    /// Presses the ACPI power button.
    pub fn power_button(&mut self) -> Result<(), QemuError> {
        self.execute("system_powerdown", None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_machine_has_iommu_edu_and_nested_virtualisation() {
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "console=ttyS0 quiet");
        c.qmp = Some(PathBuf::from("/tmp/q.sock"));
        c.second_serial = Some(PathBuf::from("/tmp/s1"));
        let line = c.command_line();
        for want in [
            "-accel tcg,thread=multi",
            "-cpu max",
            "-machine q35",
            "-device intel-iommu,intremap=on",
            "-device edu,addr=03.0",
            "-device pcie-root-port,id=rp1,chassis=1,addr=10.0",
            "-device virtio-rng-pci,bus=rp1,addr=00.0,iommu_platform=on",
            "-no-reboot",
            "-serial stdio",
            "-serial file:/tmp/s1",
            "-qmp unix:/tmp/q.sock,server=on,wait=off",
            "-append 'console=ttyS0 quiet'",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
    }
}
