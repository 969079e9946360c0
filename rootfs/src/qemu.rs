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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

pub use crate::efi::esp::Firmware;

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

/// A QEMU version (`qemu-system-x86_64 --version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn parse(version_output: &str) -> Option<Self> {
        let rest = version_output
            .lines()
            .find_map(|l| l.split("QEMU emulator version ").nth(1))?;
        let v = rest.split_whitespace().next()?;
        let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
        Some(Self {
            major: it.next()??,
            minor: it.next().flatten().unwrap_or(0),
            micro: it.next().flatten().unwrap_or(0),
        })
    }

    /// Asks `qemu` for its version (once per program and path).
    pub fn of(qemu: &Path) -> Option<Self> {
        type Seen = Vec<(PathBuf, Option<QemuVersion>)>;
        static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
        let seen = SEEN.get_or_init(|| Mutex::new(Vec::new()));
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = seen.iter().find(|(p, _)| p == qemu) {
            return *v;
        }
        let v = Command::new(qemu)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| Self::parse(&String::from_utf8_lossy(&o.stdout)));
        seen.push((qemu.to_path_buf(), v));
        v
    }
}

/// The CPU model a Bulkhead host runs on under `version` (TCG), and why.
///
/// `max` exposes SVM, which the host's KVM needs for nested guests. Under QEMU 7.2 (Debian
/// 12) the emulated host crashes at random with `-cpu max` (faults right after a
/// `cmpxchg16b`, stack-guard hits in `exc_page_fault`, QEMU killed by a signal: 2 boots in
/// 11 of the example with 6.1, 5 in 14 with 6.12); with `cx16` masked, none in 12; QEMU 10
/// (Debian 13) shows no fault with plain `max`. `BULKHEAD_QEMU_CPU` overrides the choice.
pub fn cpu_model(version: Option<QemuVersion>) -> (String, String) {
    choose_cpu_model(version, std::env::var("BULKHEAD_QEMU_CPU").ok())
}

fn choose_cpu_model(version: Option<QemuVersion>, over: Option<String>) -> (String, String) {
    if let Some(cpu) = over.filter(|c| !c.is_empty()) {
        return (cpu, "set by BULKHEAD_QEMU_CPU".into());
    }
    match version {
        Some(v) if v.major < 8 => (
            "max,-cx16".into(),
            format!(
                "cx16 masked: QEMU {v} (< 8) crashes the emulated host at random with cmpxchg16b"
            ),
        ),
        Some(v) => ("max".into(), format!("QEMU {v} needs no workaround")),
        None => (
            "max,-cx16".into(),
            "QEMU version unknown: cx16 masked to be safe".into(),
        ),
    }
}

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

/// A disk image given to the machine as a virtio-blk device with a serial (the emulated
/// host finds it as `/dev/disk/by-id/virtio-<serial>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// At most 20 bytes (virtio-blk's id field).
    pub serial: String,
    pub read_only: bool,
}

/// A QEMU machine description.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    /// `-cpu` (see [`cpu_model`]), and why it was chosen.
    pub cpu: String,
    pub cpu_reason: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    pub smp: u32,
    /// q35 with `intel-iommu`, one `edu` device (00:03.0) and a `virtio-rng-pci` behind a
    /// PCIe root port (01:00.0: MSI-X, FLR).
    pub iommu_and_edu: bool,
    /// Two NICs on one QEMU network hub with nothing else on it, so no packet leaves the
    /// QEMU process: a `virtio-net-pci` alone behind a PCIe root port ([`NETVM_NIC`]: its
    /// own IOMMU group, for a net VM by VFIO) and one on the root bus ([`PEER_NIC`], for a
    /// test peer in its own network namespace). Only with `iommu_and_edu` (q35, the IOMMU).
    pub net_hub: bool,
    /// A second serial port (the guest's ttyS1) written to this file.
    pub second_serial: Option<PathBuf>,
    /// A QMP socket.
    pub qmp: Option<PathBuf>,
    /// Disks with serials (a host image's guest root filesystems).
    pub disks: Vec<Disk>,
    /// Boot through UEFI firmware (OVMF) from an EFI system partition instead of
    /// `-kernel`: `kernel`, `initrd` and `append` are then unused (the ESP's unified kernel
    /// image carries all three).
    pub firmware: Option<Firmware>,
    /// Extra raw arguments.
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// The default Bulkhead host machine: 2 vCPUs, 2 GiB, q35 + intel-iommu + edu.
    pub fn host(kernel: &Path, initrd: &Path, append: &str) -> Self {
        let qemu = PathBuf::from("qemu-system-x86_64");
        let (cpu, cpu_reason) = cpu_model(QemuVersion::of(&qemu));
        Self {
            qemu,
            cpu,
            cpu_reason,
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            append: append.to_string(),
            memory_mib: 2048,
            smp: 2,
            iommu_and_edu: true,
            net_hub: false,
            second_serial: None,
            qmp: None,
            disks: Vec::new(),
            firmware: None,
            extra: Vec::new(),
        }
    }

    /// The default host machine booted by UEFI firmware from an ESP (see [`Firmware`]).
    pub fn host_firmware(firmware: Firmware) -> Self {
        let mut c = Self::host(Path::new(""), Path::new(""), "");
        c.firmware = Some(firmware);
        c
    }

    /// The arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg,thread=multi".into(),
            "-cpu".into(),
            self.cpu.clone(),
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
        if self.iommu_and_edu && self.net_hub {
            a.extend(
                [
                    "-device",
                    "pcie-root-port,id=rp2,chassis=2,addr=11.0",
                    "-netdev",
                    "hubport,id=netvm-nic,hubid=0",
                    "-device",
                    // iommu_platform=on: its DMA goes through intel-iommu (a VM's IOVAs).
                    "virtio-net-pci,netdev=netvm-nic,bus=rp2,addr=00.0,iommu_platform=on,mac=52:54:00:b0:00:01",
                    "-netdev",
                    "hubport,id=peer-nic,hubid=0",
                    "-device",
                    "virtio-net-pci,netdev=peer-nic,addr=12.0,mac=52:54:00:b0:00:02",
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
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=bhdisk{i}{}",
                d.path.display(),
                if d.read_only { ",readonly=on" } else { "" }
            ));
            a.push("-device".into());
            a.push(format!(
                "virtio-blk-pci,drive=bhdisk{i},serial={}",
                d.serial
            ));
        }
        match &self.firmware {
            None => a.extend([
                "-kernel".into(),
                self.kernel.display().to_string(),
                "-initrd".into(),
                self.initrd.display().to_string(),
                "-append".into(),
                self.append.clone(),
            ]),
            Some(fw) => a.extend([
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    fw.code.display()
                ),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", fw.vars.display()),
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=esp,readonly=on",
                    fw.esp.display()
                ),
                // The only boot option: no time spent on PXE or the UEFI shell first.
                "-device".into(),
                "virtio-blk-pci,drive=esp,bootindex=0".into(),
            ]),
        }
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

/// How QEMU said the machine stopped (its `SHUTDOWN` event's `reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShutdownReason {
    /// `guest-shutdown`: the emulated host powered itself off (ACPI).
    GuestShutdown,
    /// `guest-reset`: it asked to restart (with `-no-reboot` QEMU then exits); a kernel
    /// panic with `panic=-1` ends this way too.
    GuestReset,
    /// `guest-panic`: a panic device reported it.
    GuestPanic,
    /// Anything else (`host-signal`, `host-qmp-quit`, …).
    Other(String),
}

impl ShutdownReason {
    fn parse(reason: &str) -> Self {
        match reason {
            "guest-shutdown" => Self::GuestShutdown,
            "guest-reset" => Self::GuestReset,
            "guest-panic" => Self::GuestPanic,
            other => Self::Other(other.to_string()),
        }
    }
}

/// The message of a console line that the emulated host's kernel printed itself: its
/// `[ seconds]` stamp (if any) removed. Lines a nested VM's console relayed always start
/// with `<service>: ` and so never start with a kernel message's words.
pub fn host_kernel_message(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[') {
        if let Some((stamp, msg)) = rest.split_once(']') {
            if stamp.trim().parse::<f64>().is_ok() {
                return msg.strip_prefix(' ').unwrap_or(msg);
            }
        }
    }
    line
}

/// Is this the emulated host kernel's own panic line (not a relayed VM's)?
pub fn is_host_kernel_panic(line: &str) -> bool {
    host_kernel_message(line).starts_with(KERNEL_PANIC)
}

/// The one-at-a-time lock for machines on this build machine.
fn machine_lock(echo: bool) -> Option<Flock<File>> {
    let path = std::env::var_os("BULKHEAD_QEMU_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_FILE));
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{}: {e}; machines are not serialised", path.display());
            return None;
        }
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Some(l),
        Err((file, _)) => {
            let msg = format!(
                "{FIRST_LINE_PREFIX} waiting for another machine on this build machine to end \
                 (lock {})",
                path.display()
            );
            if echo {
                println!("{msg}");
            } else {
                eprintln!("{msg}");
            }
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(l) => Some(l),
                Err((_, e)) => {
                    log::warn!("{}: {e}; machines are not serialised", path.display());
                    None
                }
            }
        }
    }
}

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-qemu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads QEMU's QMP events from their own monitor socket until QEMU exits, keeping the
/// `SHUTDOWN` reason and showing each event among the recent console lines.
fn watch_events(
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

    /// Reads the console until QEMU exits and says how the machine ended: from QEMU's
    /// `SHUTDOWN` event (power-off or reset), a reset preceded by the host kernel's own
    /// panic line being a panic. Only if the event monitor could not be reached do the
    /// host kernel's own `reboot:` lines decide. A host kernel panic ends the wait at
    /// once (QEMU is killed).
    pub fn wait_end(&mut self, timeout: Duration) -> Result<Outcome, QemuError> {
        let mut saw = None;
        let res = self.wait_until("the machine to power off", timeout, |l| {
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
        c.disks.push(Disk {
            path: PathBuf::from("/c/root.ext4"),
            serial: "bh-0123456789ab".into(),
            read_only: true,
        });
        let line = c.command_line();
        for want in [
            "-accel tcg,thread=multi",
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
            "-drive file=/c/root.ext4,format=raw,if=none,id=bhdisk0,readonly=on",
            "-device virtio-blk-pci,drive=bhdisk0,serial=bh-0123456789ab",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
    }

    #[test]
    fn the_net_hub_adds_two_nics_on_one_closed_hub_and_only_when_asked() {
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "quiet");
        let plain = c.command_line();
        assert!(!plain.contains("virtio-net-pci") && !plain.contains("-netdev"));
        assert!(plain.contains("-nic none"), "no default NIC");
        c.net_hub = true;
        let line = c.command_line();
        for want in [
            "-device pcie-root-port,id=rp2,chassis=2,addr=11.0",
            "-netdev hubport,id=netvm-nic,hubid=0",
            "virtio-net-pci,netdev=netvm-nic,bus=rp2,addr=00.0,iommu_platform=on",
            "-netdev hubport,id=peer-nic,hubid=0",
            "virtio-net-pci,netdev=peer-nic,addr=12.0",
            "-nic none",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        // Nothing but the two hub ports: no user, tap, socket or bridge backend.
        for backend in [
            "user", "tap,", "socket", "stream", "dgram", "bridge", "vde", "l2tpv3",
        ] {
            assert!(!line.contains(&format!("-netdev {backend}")), "{line}");
        }
        assert_eq!(line.matches("-netdev ").count(), 2);
    }

    #[test]
    fn a_firmware_boot_has_ovmf_and_the_esp_and_no_kernel() {
        let fw = Firmware {
            code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            vars: PathBuf::from("/t/vars.fd"),
            esp: PathBuf::from("/t/esp.img"),
        };
        let line = QemuConfig::host_firmware(fw).command_line();
        for want in [
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive if=pflash,format=raw,unit=1,file=/t/vars.fd",
            "-drive file=/t/esp.img,format=raw,if=none,id=esp,readonly=on",
            "-device virtio-blk-pci,drive=esp,bootindex=0",
            "-machine q35",
            "-device intel-iommu,intremap=on",
            "-no-reboot",
        ] {
            assert!(line.contains(want), "{want:?} missing from {line}");
        }
        for never in ["-kernel", "-initrd", "-append"] {
            assert!(!line.contains(never), "{never} in {line}");
        }
    }

    #[test]
    fn qemu_versions_parse_from_version_output() {
        let deb12 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                     Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(
            QemuVersion::parse(deb12),
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            })
        );
        let deb13 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)";
        assert_eq!(QemuVersion::parse(deb13).map(|v| v.major), Some(10));
        assert_eq!(QemuVersion::parse("qemu-img version 7.2.0"), None);
    }

    #[test]
    fn cx16_is_masked_below_qemu_8_only() {
        let v = |major| {
            Some(QemuVersion {
                major,
                minor: 0,
                micro: 0,
            })
        };
        assert_eq!(choose_cpu_model(v(7), None).0, "max,-cx16");
        assert_eq!(choose_cpu_model(v(10), None).0, "max");
        assert_eq!(choose_cpu_model(None, None).0, "max,-cx16");
        assert_eq!(choose_cpu_model(v(7), Some("max".into())).0, "max");
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "quiet");
        c.cpu = choose_cpu_model(v(7), None).0;
        assert!(c.command_line().contains("-cpu max,-cx16 "));
    }

    #[test]
    fn only_the_host_kernels_own_lines_are_its_verdicts() {
        assert!(is_host_kernel_panic(
            "[    5.123456] Kernel panic - not syncing: Attempted to kill init!"
        ));
        assert!(is_host_kernel_panic("Kernel panic - not syncing: VFS"));
        // A nested VM's console, relayed by init with its service name first.
        assert!(!is_host_kernel_panic(
            "hello-vm: [    1.000000] Kernel panic - not syncing: oops"
        ));
        assert!(!is_host_kernel_panic("hello-vm: Kernel panic"));
        assert_eq!(
            host_kernel_message("[   12.5] reboot: Power down"),
            "reboot: Power down"
        );
        assert!(!host_kernel_message("edu-vm: reboot: Power down").starts_with(POWER_DOWN));
    }
}
