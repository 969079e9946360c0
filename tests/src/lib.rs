//! The end-to-end harness: builds a host image for a test system (a directory under
//! `tests/systems/` with `system.toml` and `policy.d/`), boots it under QEMU through
//! `bulkhead_rootfs::qemu`, and gives tests waits with deadlines. Every failure message
//! carries the QEMU command line and the last console lines. Boots run one at a time (the
//! machine has two cores; parallel TCG guests only slow each other down).
//!
//! Whose line is it: the emulated host's init prints `bulkhead-init: …`, and it relays every
//! console line of a service or nested VM as `<service>: …`. The waits and lookups here
//! match a needle at the **start** of a line, so a needle that begins with the speaker's
//! name (`bulkhead-init: `, `edu-vm: `) can only be met by that speaker: a VM that prints
//! `bulkhead-init: ready` shows up as `vm: bulkhead-init: ready` and meets nothing.
//! [`Host::expect_end`] also accounts for every restart init made during the test: a
//! restart the test did not declare with [`BootOptions::restarts_allowed`] fails it, except
//! the documented nested-emulation flake (a VMM exiting 3 after a guest triple fault), which
//! is reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bulkhead_rootfs::image::{build_system_image, SystemDir};
use bulkhead_rootfs::kernel::plan::{KernelOverrides, SystemKernels};
use bulkhead_rootfs::kernel::{Cache, ChoiceOverride, Kernel, KernelChoice};
use bulkhead_rootfs::qemu::{Disk, Machine, Outcome, QemuConfig, QemuError, Qmp};
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

/// The tests' second kernel ([`KernelChoice::second`]: Debian's cloud kernel from the build
/// machine's backports, the 6.12 line on Debian 12), which `provision` fetches, as a choice.
pub fn second_kernel() -> ChoiceOverride {
    let c = KernelChoice::second();
    ChoiceOverride {
        flavour: Some(c.flavour),
        suite: Some(c.suite),
    }
}

/// Host and guests on the second kernel.
pub fn all_on_second_kernel() -> KernelOverrides {
    KernelOverrides {
        host: second_kernel(),
        guests: second_kernel(),
    }
}

/// The guests on the second kernel, the host on the default one.
pub fn guests_on_second_kernel() -> KernelOverrides {
    KernelOverrides {
        guests: second_kernel(),
        ..Default::default()
    }
}

fn systems_dir() -> PathBuf {
    workspace_dir().join("tests/systems")
}

/// A system's directory: `tests/systems/<name>`, or `name` itself when it is an absolute
/// path (a test's variant of a system).
fn system_src(name: &str) -> PathBuf {
    if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        systems_dir().join(name)
    }
}

/// The kernels the system `name` (see [`system_src`]) boots with `over`; fails the test
/// with the command to run when one is not provisioned.
pub fn kernels(name: &str, over: &KernelOverrides) -> SystemKernels {
    let sys = SystemDir::load(&system_src(name))
        .unwrap_or_else(|e| panic!("loading the {name} system: {e}"));
    sys.kernel_plan(over)
        .and_then(|p| {
            p.resolve(&Cache::default_location())
                .map_err(bulkhead_rootfs::image::ImageError::from)
        })
        .unwrap_or_else(|e| panic!("{e} (the README's test command does this for you)"))
}

/// Builds (once per test process) the host image for the system `name` (see
/// [`system_src`]).
pub fn image(name: &str) -> PathBuf {
    image_with(name, &KernelOverrides::default()).0
}

/// Builds (once per test process) the host image for the system `name` with its default
/// kernels; returns it and the disks the emulated host gets besides it (guests' root
/// filesystems).
pub fn image_and_disks(name: &str) -> (PathBuf, Vec<Disk>) {
    let (image, _, disks) = image_with(name, &KernelOverrides::default());
    (image, disks)
}

/// Builds (once per test process and kernel choice) the host image for
/// `tests/systems/<name>` with the kernels `over` chooses; returns it, the kernels and the
/// disks the emulated host gets besides it.
pub fn image_with(name: &str, over: &KernelOverrides) -> (PathBuf, SystemKernels, Vec<Disk>) {
    type Built = HashMap<(String, String), (PathBuf, SystemKernels, Vec<Disk>)>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    let key = (name.to_string(), over.tag());
    if let Some(b) = built.get(&key) {
        return b.clone();
    }
    let kernels = kernels(name, over);
    let src = system_src(name);
    let base = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = if key.1.is_empty() {
        base
    } else {
        format!("{base}-{}", key.1)
    };
    let out = workspace_dir()
        .join("target/bulkhead-tests")
        .join(dir)
        .join("host.cpio.gz");
    let disks = build_system_image(
        &kernels,
        Cache::default_location().dir(),
        &workspace_dir(),
        &src,
        &out,
    )
    .unwrap_or_else(|e| panic!("building the {name} image: {e}"));
    built.insert(key, (out.clone(), kernels.clone(), disks.clone()));
    (out, kernels, disks)
}

fn boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a test's panic message starts with when the emulated host's CPU reset itself
/// ([`retry_on_emulator_reset`]).
pub const EMULATOR_RESET: &str = "EMULATOR RESET";

pub use bulkhead_rootfs::qemu::EMULATOR_RERUNS;

/// Runs an end-to-end test, and again (up to [`EMULATOR_RERUNS`] times) while it fails
/// because the emulated host's CPU or kernel crashed (QEMU TCG's nested SVM, README's known
/// flakes: decided only from QEMU's own events and the host kernel's own lines, never from a
/// guest's, so none of Bulkhead's code could have caused it). Said on stderr
/// (`EMULATOR FLAKE`); any other failure fails the test at once, and so does a crash on the
/// last run.
pub fn retry_on_emulator_reset(test: &str, f: impl Fn()) {
    for run in 0.. {
        let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&f)) else {
            return;
        };
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if !msg.starts_with(EMULATOR_RESET) || run == EMULATOR_RERUNS {
            std::panic::resume_unwind(payload);
        }
        eprintln!(
            "EMULATOR FLAKE: {test}: the emulated host crashed or reset itself; running the \
             test again ({} of {EMULATOR_RERUNS})",
            run + 1
        );
    }
}

/// A booted host under test. Dropping it kills QEMU.
pub struct Host {
    machine: Machine,
    /// How the machine was started, for one new start when the emulated host's kernel
    /// panicked before init ran (see [`Host::expect_line_within`]).
    cfg: QemuConfig,
    echo: bool,
    respawned: bool,
    system: String,
    /// The emulated host's second serial port (a GUI VM's pictures, if any).
    screens: PathBuf,
    restarts_allowed: Vec<String>,
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
    /// Services whose restarts by init are part of what the test exercises.
    pub restarts_allowed: Vec<String>,
    /// Kernels other than the systems' own choices (default: theirs).
    pub kernels: KernelOverrides,
    /// Two NICs on a closed QEMU hub (`QemuConfig::net_hub`): the net VM's and a peer's.
    pub net_hub: bool,
    /// Boot as a real machine does: OVMF starts the system's unified kernel image (the
    /// host kernel, the image and the command line in one EFI executable, what
    /// `bulkhead-rootfs build --efi` writes) from an EFI system partition, instead of
    /// QEMU's `-kernel`.
    pub efi: bool,
    /// A screen ([`QemuConfig::display`]): a `bochs-display` for a VM by VFIO, read with
    /// [`Host::screendump`].
    pub display: bool,
}

/// One restart init made: the service and how its run before ended
/// (`exited with status 3`, `killed by signal SIGKILL`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub service: String,
    pub how: String,
}

pub use bulkhead_rootfs::qemu::VMM_GUEST_CRASH_STATUS;

/// Every restart init announced in `lines` (`bulkhead-init: <svc> restarting in …`), each
/// with how the run before it ended.
pub fn restarts(lines: &[String]) -> Vec<Restart> {
    let mut last_end: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for l in lines {
        let Some(rest) = l.strip_prefix("bulkhead-init: ") else {
            continue;
        };
        if let Some((svc, how)) = rest.split_once(' ') {
            if how.starts_with("exited with ") || how.starts_with("killed by ") {
                last_end.insert(svc.to_string(), how.to_string());
                continue;
            }
            if how.starts_with("restarting in ") {
                out.push(Restart {
                    service: svc.to_string(),
                    how: last_end
                        .get(svc)
                        .cloned()
                        .unwrap_or_else(|| "ended (no exit line seen)".into()),
                });
            }
        }
    }
    out
}

impl Host {
    /// Boots `tests/systems/<system>` with default options.
    pub fn boot(system: &str) -> Self {
        Self::boot_with(system, BootOptions::default())
    }

    pub fn boot_with(system: &str, opts: BootOptions) -> Self {
        let (image, kernels, disks) = image_with(system, &opts.kernels);
        let kernel = &kernels.host;
        let guard = boot_lock();
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-test-{}-{}",
            std::process::id(),
            system.replace('/', "_")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        // BULKHEAD_TEST_APPEND adds kernel parameters to every test host (for diagnosis,
        // e.g. `softlockup_panic=1 loglevel=5`).
        let extra = std::env::var("BULKHEAD_TEST_APPEND").unwrap_or_default();
        let append = format!("{HOST_CMDLINE} {} {extra}", opts.append);
        let mut cfg = if opts.efi {
            QemuConfig::host_firmware(efi_firmware(system, kernel, &image, append.trim(), &dir))
        } else {
            QemuConfig::host(&kernel.vmlinuz, &image, append.trim())
        };
        cfg.qmp = Some(dir.join("qmp.sock"));
        cfg.disks = disks;
        let screens = dir.join("screens.bin");
        cfg.second_serial = Some(screens.clone());
        cfg.net_hub = opts.net_hub;
        cfg.display = opts.display;
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
            cfg,
            echo,
            respawned: false,
            system: system.to_string(),
            screens,
            restarts_allowed: opts.restarts_allowed.clone(),
            _dir: TempDir(dir),
            _serialise: guard,
        }
    }

    /// Waits for a console line that starts with `needle`; fails the test (with the QEMU
    /// command line and the last console lines) on timeout, host kernel panic or QEMU exit.
    pub fn expect(&mut self, needle: &str) -> String {
        self.expect_within(needle, STEP_TIMEOUT)
    }

    /// Waits for a console line that starts with `needle`, for up to `timeout`.
    pub fn expect_within(&mut self, needle: &str, timeout: Duration) -> String {
        self.expect_line_within(needle, timeout, |l| l.starts_with(needle))
    }

    /// Has a line that starts with `needle` been seen?
    pub fn saw(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.starts_with(needle))
    }

    /// The first line seen that starts with `needle`; fails the test if there is none.
    pub fn line_starting(&self, needle: &str) -> String {
        self.lines()
            .iter()
            .find(|l| l.starts_with(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no line starting {needle:?}\n{}", self.context()))
    }

    /// Every restart init made so far.
    pub fn restarts(&self) -> Vec<Restart> {
        restarts(self.lines())
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
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        loop {
            match self.machine.wait_until(what, timeout, &mut pred) {
                Ok(line) => return line,
                // The emulated host's own kernel panicked before init said anything: none
                // of Bulkhead's code has run, so this is the emulator (QEMU TCG with nested
                // SVM, README's known flakes). Said on stderr, and booted again, once.
                Err(e @ QemuError::Panic { .. })
                    if !self.respawned && !self.saw("bulkhead-init: ") =>
                {
                    eprintln!(
                        "EMULATOR FLAKE: the emulated host's kernel panicked before init ran; \
                         booting {} again (once):\n{e}",
                        self.system
                    );
                    self.respawned = true;
                    self.machine
                        .respawn(&self.cfg, self.echo)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                // The emulated host's kernel crashed after init started, and not because init
                // died: user space cannot crash a kernel (the crashes seen are TCG's nested
                // SVM: stack-guard hits in the page-fault handler right after a guest entry).
                Err(QemuError::Panic { line, context, .. })
                    if bulkhead_rootfs::qemu::is_emulator_crash(&line) =>
                {
                    panic!(
                        "{EMULATOR_RESET}: the emulated host's kernel crashed: {line}\n{context}"
                    )
                }
                Err(e @ QemuError::Exited { .. }) if self.reset_silently() => {
                    panic!(
                        "{EMULATOR_RESET}: the emulated host's CPU reset itself (QEMU's SHUTDOWN \
                            said guest-reset, with no host kernel panic or restart line and no \
                            shutdown by init before it)\n{e}"
                    )
                }
                // A wait that timed out after a VM's guest crashed (VMM status 3: the
                // nested-emulation triple fault, README's known flakes): init restarted the
                // VM, but what the test waited for may have died with it. Run again, like a
                // crash of the emulated host.
                Err(e @ QemuError::Timeout { .. })
                    if self
                        .lines()
                        .iter()
                        .any(|l| bulkhead_rootfs::qemu::is_guest_crash(l)) =>
                {
                    panic!(
                        "{EMULATOR_RESET}: a VM's guest crashed (triple fault) before this wait \
                         timed out\n{e}{}",
                        self.keep_console()
                    )
                }
                Err(e) => panic!("{e}{}", self.keep_console()),
            }
        }
    }

    /// Writes every console line seen so far to
    /// `target/bulkhead-tests/<system>/console-failed.txt` (a failure shows only the last
    /// ones) and says where, for the failure's message.
    fn keep_console(&self) -> String {
        let dir = workspace_dir()
            .join("target/bulkhead-tests")
            .join(&self.system);
        let path = dir.join("console-failed.txt");
        let _ = std::fs::create_dir_all(&dir);
        match std::fs::write(&path, self.lines().join("\n")) {
            Ok(()) => format!("\n--- the whole console: {}", path.display()),
            Err(e) => format!(
                "\n--- the whole console was not kept: {}: {e}",
                path.display()
            ),
        }
    }

    /// QEMU ended the machine by a reset that nothing in it asked for: its `SHUTDOWN` event
    /// says `guest-reset`, and neither the host kernel (a panic, `reboot: Restarting
    /// system`) nor init (`shutdown started`) said a word of it. User space (init, the
    /// VMMs) cannot reset a CPU; the emulated CPU triple-faulted (README's known flakes).
    fn reset_silently(&mut self) -> bool {
        if self.machine.shutdown_reason() != Some(bulkhead_rootfs::qemu::ShutdownReason::GuestReset)
        {
            return false;
        }
        !self.lines().iter().any(|l| {
            let msg = bulkhead_rootfs::qemu::host_kernel_message(l);
            msg.starts_with(RESTARTING)
                || bulkhead_rootfs::qemu::is_host_kernel_panic(l)
                || l.starts_with("bulkhead-init: shutdown started")
        })
    }

    /// Waits until QEMU exits and checks how the machine ended, then accounts for the
    /// restarts init made (see the module's doc).
    pub fn expect_end(&mut self, want: Outcome) {
        let got = self
            .machine
            .wait_end(BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        if got == Outcome::Reboot && want != Outcome::Reboot && self.reset_silently() {
            panic!(
                "{EMULATOR_RESET}: the emulated host's CPU reset itself instead of {want:?}\n{}",
                self.machine.context()
            );
        }
        // The host kernel's own panic line, and not init dying: the emulator (as in
        // `expect_line_within`).
        if let Outcome::Panic(line) = &got {
            if want != got && bulkhead_rootfs::qemu::is_emulator_crash(line) {
                panic!(
                    "{EMULATOR_RESET}: the emulated host's kernel crashed instead of {want:?}: \
                     {line}\n{}",
                    self.machine.context()
                );
            }
        }
        assert_eq!(
            got,
            want,
            "the machine ended differently\n{}",
            self.machine.context()
        );
        self.check_restarts();
    }

    /// Reports every restart; fails on one the test did not declare, unless it is the
    /// nested-emulation flake (a VMM that exited 3).
    pub fn check_restarts(&self) {
        for r in self.restarts() {
            if self.restarts_allowed.contains(&r.service) {
                continue;
            }
            if r.how == VMM_GUEST_CRASH_STATUS {
                eprintln!(
                    "warning: init restarted {} after it {} (a guest triple fault: the known \
                     nested-emulation flake)",
                    r.service, r.how
                );
                continue;
            }
            panic!(
                "init restarted {} after it {} during the test\n{}",
                r.service,
                r.how,
                self.context()
            );
        }
    }

    /// Every console line seen so far.
    pub fn lines(&self) -> &[String] {
        self.machine.lines()
    }

    /// The QEMU command line the host runs under.
    pub fn command_line(&self) -> &str {
        self.machine.command_line()
    }

    /// The command line and recent console output, for assertion messages.
    pub fn context(&self) -> String {
        self.machine.context()
    }

    /// QMP, to press buttons.
    pub fn qmp(&self) -> Qmp {
        self.machine.qmp().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Presses `k` on the emulated host's keyboard (QMP `send-key`), for a host service
    /// (`bulkhead-testprog screen-killer SERVICE`) to SIGKILL `service`, and waits until init
    /// said the service was killed (its line and the killer's may come in either order).
    pub fn kill_by_key(&mut self, service: &str) {
        self.qmp()
            .execute(
                "send-key",
                Some(serde_json::json!({ "keys": [{"type": "qcode", "data": "k"}] })),
            )
            .unwrap_or_else(|e| panic!("send-key: {e}"));
        let killed = format!("bulkhead-init: {service} killed by signal SIGKILL");
        let killer = format!("killer: testprog: screen-killer: killed {service}");
        self.expect_line("the kill", |l| {
            l.starts_with(&killed) || l.starts_with(&killer)
        });
        if !self.saw(&killed) {
            self.expect(&killed);
        }
    }

    /// The pictures a GUI VM sent so far (decoded; written under
    /// `target/bulkhead-tests/<system>/pictures/`).
    pub fn pictures(&self) -> Vec<bulkhead_rootfs::screens::Picture> {
        let out = workspace_dir()
            .join("target/bulkhead-tests")
            .join(&self.system)
            .join("pictures");
        bulkhead_rootfs::screens::extract(&self.screens, &out)
            .unwrap_or_else(|e| panic!("the pictures: {e}\n{}", self.context()))
    }

    /// What the emulated host's screen ([`BootOptions::display`]) shows now, from QEMU
    /// itself (QMP `screendump` with the machine paused), written to
    /// `target/bulkhead-tests/<system>/<name>.png` and decoded.
    pub fn screendump(&self, name: &str) -> bulkhead_rootfs::screens::Image {
        let dir = workspace_dir()
            .join("target/bulkhead-tests")
            .join(&self.system);
        let _ = std::fs::create_dir_all(&dir);
        let png = dir.join(format!("{name}.png"));
        self.qmp()
            .screendump(bulkhead_rootfs::qemu::DISPLAY_ID, &png)
            .unwrap_or_else(|e| panic!("screendump {name}: {e}\n{}", self.context()));
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        bulkhead_rootfs::screens::decode_png(name, &bytes)
            .unwrap_or_else(|e| panic!("screendump {name}: {e}"))
    }

    /// Takes a screendump named `name` ([`Host::screendump`]) and asserts that the screen is
    /// black: not one pixel lit. `what` says, for a failure, whose pixels those would be.
    pub fn assert_screen_black(&self, name: &str, what: &str) {
        let img = self.screendump(name);
        let lit = img.lit_pixels();
        assert_eq!(
            lit,
            0,
            "{lit} pixels {what} ({}x{})\n{}",
            img.width,
            img.height,
            self.context()
        );
    }

    /// Asserts that no line seen so far contains `needle` (anywhere: stricter than the
    /// start-of-line matches above).
    pub fn assert_never_saw(&self, needle: &str) {
        if let Some(l) = self.lines().iter().find(|l| l.contains(needle)) {
            panic!("unexpected console line {l:?}\n{}", self.context());
        }
    }
}

/// Writes the unified kernel image of `system` (beside its host image) and an EFI system
/// partition holding it, and returns OVMF booting that partition with its variables in
/// `dir`.
fn efi_firmware(
    system: &str,
    kernel: &Kernel,
    image: &Path,
    cmdline: &str,
    dir: &Path,
) -> bulkhead_rootfs::qemu::Firmware {
    use bulkhead_rootfs::efi;
    let out = image.parent().unwrap_or(dir);
    let uki = out.join("bulkhead.efi");
    efi::host_uki(
        &Cache::default_location(),
        kernel,
        image,
        cmdline,
        system,
        &uki,
    )
    .unwrap_or_else(|e| panic!("the EFI image of {system}: {e}"));
    let esp = out.join("esp.img");
    efi::esp::write_esp(&uki, &esp).unwrap_or_else(|e| panic!("{e}"));
    efi::esp::Firmware::ovmf(&esp, &dir.join("ovmf-vars.fd")).unwrap_or_else(|e| panic!("{e}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A test that failed by an emulator reset runs again, up to `EMULATOR_RERUNS` times;
    /// any other failure, or a reset on the last run, fails it.
    #[test]
    fn only_an_emulator_reset_runs_a_test_again_and_only_twice() {
        use std::cell::Cell;
        let runs = Cell::new(0);
        retry_on_emulator_reset("t", || {
            runs.set(runs.get() + 1);
            if runs.get() <= EMULATOR_RERUNS {
                panic!("{EMULATOR_RESET}: the CPU reset itself");
            }
        });
        assert_eq!(runs.get(), EMULATOR_RERUNS + 1);

        let runs = Cell::new(0);
        let other = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            retry_on_emulator_reset("t", || {
                runs.set(runs.get() + 1);
                panic!("no line starting \"x\"");
            })
        }));
        assert!(other.is_err());
        assert_eq!(runs.get(), 1, "another failure is not run again");

        let runs = Cell::new(0);
        let always = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            retry_on_emulator_reset("t", || {
                runs.set(runs.get() + 1);
                panic!("{EMULATOR_RESET}: again");
            })
        }));
        assert!(always.is_err());
        assert_eq!(
            runs.get(),
            EMULATOR_RERUNS + 1,
            "a reset on the last run fails the test"
        );
    }

    #[test]
    fn restarts_are_read_from_inits_own_lines_with_how_the_run_before_ended() {
        let lines: Vec<String> = [
            "bulkhead-init: edu-vm exited with status 3",
            "bulkhead-init: edu-vm restarting in 500 ms",
            "hello-vm: bulkhead-init: fake-vm restarting in 1 ms",
            "bulkhead-init: crashy killed by signal SIGSEGV",
            "bulkhead-init: crashy restarting in 100 ms",
            "bulkhead-init: edu-vm exited with status 0",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            restarts(&lines),
            vec![
                Restart {
                    service: "edu-vm".into(),
                    how: "exited with status 3".into()
                },
                Restart {
                    service: "crashy".into(),
                    how: "killed by signal SIGSEGV".into()
                },
            ]
        );
    }
}
