//! QMP, QEMU's JSON machine protocol: commands (the power button, ctrl-alt-del, screendumps)
//! and the event watcher that keeps the `SHUTDOWN` reason.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::verdict::ShutdownReason;
use super::{QemuError, KEEP_LINES};

/// Reads QEMU's QMP events from their own monitor socket until QEMU exits, keeping the
/// `SHUTDOWN` reason and showing each event among the recent console lines.
pub(super) fn watch_events(
    path: PathBuf,
    shutdown: Arc<Mutex<Option<ShutdownReason>>>,
    recent: Arc<Mutex<VecDeque<String>>>,
    ready: Sender<()>,
) {
    let mut qmp = match Qmp::connect(&path) {
        Ok(q) => q,
        Err(e) => {
            log::warn!("QMP events: {e}; the verdict falls back to the host kernel's lines");
            return;
        }
    };
    let _ = ready.send(());
    let _ = qmp.reader.get_ref().set_read_timeout(None);
    while let Ok(m) = qmp.read_message() {
        let Some(event) = m.get("event").and_then(|e| e.as_str()) else {
            continue;
        };
        if let Ok(mut q) = recent.lock() {
            if q.len() == KEEP_LINES {
                q.pop_front();
            }
            q.push_back(format!("[qmp event] {event} {}", m["data"]));
        }
        if event == "SHUTDOWN" {
            let reason = m["data"]["reason"].as_str().unwrap_or("unknown");
            if let Ok(mut s) = shutdown.lock() {
                s.get_or_insert(ShutdownReason::parse(reason));
            }
        }
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

    /// Writes what screen `device` (a QEMU device id) shows to `png`, with the machine
    /// paused around it (`stop`, `screendump`, `cont`): the picture of one moment, not of a
    /// guest halfway through a redraw.
    pub fn screendump(&mut self, device: &str, png: &Path) -> Result<(), QemuError> {
        let _ = std::fs::remove_file(png);
        self.execute("stop", None)?;
        let shot = self.execute(
            "screendump",
            Some(serde_json::json!({
                "filename": png.display().to_string(),
                "format": "png",
                "device": device,
            })),
        );
        let cont = self.execute("cont", None);
        shot?;
        cont?;
        if png.is_file() {
            Ok(())
        } else {
            Err(QemuError::Qmp(format!(
                "screendump of {device}: QEMU wrote no {}",
                png.display()
            )))
        }
    }

    /// Presses the ACPI power button.
    pub fn power_button(&mut self) -> Result<(), QemuError> {
        self.execute("system_powerdown", None).map(|_| ())
    }
}
