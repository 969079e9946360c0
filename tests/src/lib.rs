//! The end-to-end harness: builds a host image for a test system (a directory under
//! `tests/systems/` with `system.toml` and `policy.d/`), boots it under QEMU through
//! `bulkhead_rootfs::qemu`, and gives tests waits with deadlines. Every failure message
//! carries the QEMU command line and the last console lines. Boots run one at a time (the
//! machine has two cores; parallel TCG guests only slow each other down).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bulkhead_rootfs::image::build_system_image;
use bulkhead_rootfs::kernel::{Cache, Kernel};
use bulkhead_rootfs::qemu::{Disk, Machine, Outcome, QemuConfig, Qmp};
use bulkhead_rootfs::{workspace_dir, HOST_CMDLINE};

pub use bulkhead_rootfs::qemu::{POWER_DOWN, RESTARTING};

/// Generous deadlines: software emulation on a shared two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
pub const STEP_TIMEOUT: Duration = Duration::from_secs(90);

/// The provisioned kernel; fails the test with the command to run when there is none.
pub fn kernel() -> Kernel {
    Kernel::current(&Cache::default_location())
        .unwrap_or_else(|e| panic!("{e} (the README's test command does this for you)"))
}

fn systems_dir() -> PathBuf {
    workspace_dir().join("tests/systems")
}

/// Builds (once per test process) the host image for `tests/systems/<name>`; returns it
/// and the disks the emulated host gets besides it (guests' root filesystems).
pub fn image_and_disks(name: &str) -> (PathBuf, Vec<Disk>) {
    type Built = HashMap<String, (PathBuf, Vec<Disk>)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let out = workspace_dir()
        .join("target/bulkhead-tests")
        .join(name)
        .join("host.cpio.gz");
    let disks = build_system_image(
        &kernel(),
        Cache::default_location().dir(),
        &workspace_dir(),
        &systems_dir().join(name),
        &out,
    )
    .unwrap_or_else(|e| panic!("building the {name} image: {e}"));
    built.insert(name.to_string(), (out.clone(), disks.clone()));
    (out, disks)
}

/// Builds (once per test process) the host image for `tests/systems/<name>`.
pub fn image(name: &str) -> PathBuf {
    image_and_disks(name).0
}

fn boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A booted host under test. Dropping it kills QEMU.
pub struct Host {
    machine: Machine,
    _dir: TempDir,
    _serialise: MutexGuard<'static, ()>,
}

/// A scratch directory removed on drop (QMP socket, second serial port).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options for a boot.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Extra kernel command line.
    pub append: String,
    /// A raw disk image given to the host as a virtio-blk disk (its `/dev/vda`).
    pub disk: Option<PathBuf>,
}

impl Host {
    /// Boots `tests/systems/<system>` with default options.
    pub fn boot(system: &str) -> Self {
        Self::boot_with(system, BootOptions::default())
    }

    pub fn boot_with(system: &str, opts: BootOptions) -> Self {
        let (image, disks) = image_and_disks(system);
        let kernel = kernel();
        let guard = boot_lock();
        let dir =
            std::env::temp_dir().join(format!("bulkhead-test-{}-{}", std::process::id(), system));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let append = format!("{HOST_CMDLINE} {}", opts.append);
        let mut cfg = QemuConfig::host(&kernel.vmlinuz, &image, append.trim());
        cfg.qmp = Some(dir.join("qmp.sock"));
        cfg.disks = disks;
        if let Some(disk) = &opts.disk {
            cfg.extra.extend([
                "-drive".to_string(),
                format!("file={},format=raw,if=virtio", disk.display()),
            ]);
        }
        let echo = std::env::var_os("BULKHEAD_TEST_ECHO").is_some();
        let machine = Machine::spawn(&cfg, echo).unwrap_or_else(|e| panic!("{e}"));
        Host {
            machine,
            _dir: TempDir(dir),
            _serialise: guard,
        }
    }

    /// Waits for a console line containing `needle`; fails the test (with the QEMU command
    /// line and the last console lines) on timeout, kernel panic or QEMU exit.
    pub fn expect(&mut self, needle: &str) -> String {
        self.machine
            .wait_for(needle, STEP_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for a console line containing `needle`, for up to `timeout`.
    pub fn expect_within(&mut self, needle: &str, timeout: Duration) -> String {
        self.machine
            .wait_for(needle, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits for a console line satisfying `pred`.
    pub fn expect_line(&mut self, what: &str, pred: impl FnMut(&str) -> bool) -> String {
        self.expect_line_within(what, STEP_TIMEOUT, pred)
    }

    /// Waits for a console line satisfying `pred`, for up to `timeout`.
    pub fn expect_line_within(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> String {
        self.machine
            .wait_until(what, timeout, pred)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until QEMU exits and checks how the machine ended.
    pub fn expect_end(&mut self, want: Outcome) {
        let got = self
            .machine
            .wait_end(BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got,
            want,
            "the machine ended differently\n{}",
            self.machine.context()
        );
    }

    /// Every console line seen so far.
    pub fn lines(&self) -> &[String] {
        self.machine.lines()
    }

    /// The command line and recent console output, for assertion messages.
    pub fn context(&self) -> String {
        self.machine.context()
    }

    /// QMP, to press buttons.
    pub fn qmp(&self) -> Qmp {
        self.machine.qmp().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Asserts that no line seen so far contains `needle`.
    pub fn assert_never_saw(&self, needle: &str) {
        if let Some(l) = self.lines().iter().find(|l| l.contains(needle)) {
            panic!("unexpected console line {l:?}\n{}", self.context());
        }
    }
}

/// The `uptime_ms=<n>` value `bulkhead-testprog crash` prints.
pub fn uptime_ms(line: &str) -> Option<u64> {
    line.split("uptime_ms=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A path inside the workspace, for test fixtures.
pub fn workspace_path(rel: &str) -> PathBuf {
    Path::new(&workspace_dir()).join(rel)
}

pub use bulkhead_rootfs::qemu::Outcome as End;
