//! The jail init builds around every VMM (a service with `vm =`) and around the hub, between
//! fork and exec: what a taken-over process could still reach is what init handed it.
//!
//! In the parent (init), before the fork, [`JailSpec::prepare`] does everything that may
//! allocate or fail with a message: the cgroup `/sys/fs/cgroup/bulkhead/<name>` and its limits,
//! the mount plan (every path as a C string, every bind source opened `O_PATH`), the Landlock
//! ruleset. In the child, [`Prepared::enter`] only makes system calls on that memory, in this
//! order:
//!
//! 1. `setsid` (its own session and process group);
//! 2. joins the cgroup (writes `0` to `cgroup.procs`, opened by the parent);
//! 3. rlimits: `NOFILE` explicit, `MEMLOCK` unlimited only with VFIO, `CORE` 0;
//! 4. a new PID namespace: the child forks once more; the new process is PID 1 there and
//!    goes on with the steps below, the child stays outside as its keeper (init's child:
//!    it ends the way the service ends; see [`keeper`]);
//! 5. new mount, IPC, UTS and network namespaces;
//! 6. an empty tmpfs as the new root (`pivot_root`; on an initramfs root, which cannot be
//!    pivoted, moved over `/` and chrooted into, as switch_root does) holding only the program and the paths it
//!    opens by name, bind-mounted read-only (the hub's runtime directory read-write), for
//!    the hub a procfs of its own PID namespace (read-only), then the tmpfs itself
//!    read-only; the VM's name as hostname;
//! 7. every capability dropped from the bounding and ambient sets (with the `caps` crate),
//!    no supplementary groups, gid and uid switched (the kernel clears permitted and
//!    effective), inheritable cleared; then the parent-death signal (SIGKILL when the
//!    keeper dies);
//! 8. `no_new_privs`;
//! 9. every descriptor above the handed-over ones marked close-on-exec;
//! 10. Landlock, where the kernel has it: file access only beneath the bound paths (and the
//!     hub's own `/proc`), no TCP, no abstract sockets or signals outside the jail.
//!
//! seccomp is the process's own business (the VMM and the hub install their filters after
//! setup, before reading any input): init cannot know which thread does what.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, Scope, ABI,
};
use log::warn;

/// Where the jails of a host live.
#[derive(Debug, Clone)]
pub struct JailPaths {
    /// The cgroup2 mount (`/sys/fs/cgroup`); `None` runs without cgroups (test mode).
    pub cgroup_root: Option<PathBuf>,
    /// An empty directory the child mounts its new root on (in its own mount namespace).
    pub staging: PathBuf,
}

impl JailPaths {
    /// PID 1's: `/sys/fs/cgroup` and `/run/bulkhead/jail`.
    pub fn host() -> JailPaths {
        JailPaths {
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
            staging: Path::new(crate::config::INIT_RUNTIME_DIR).join("jail"),
        }
    }
}

/// Where a jail's cgroup is, below the cgroup2 root.
pub const CGROUP_PARENT: &str = "bulkhead";

/// Defaults of the knobs system.toml may override.
pub mod defaults {
    /// A VMM's memory beyond guest RAM: its own heap and stacks, KVM's structures, and the
    /// virtio_wl shared memory its guest touches first (the policy's shm quota).
    pub const VMM_OVERHEAD: u64 = 128 << 20;
    /// Guest RAM when the VMM's command line does not say (`bulkhead-vmm`'s own default).
    pub const GUEST_MEMORY: u64 = 256 << 20;
    /// The hub's memory.max.
    pub const HUB_MEMORY: u64 = 256 << 20;
    /// Threads and processes of one VMM (vCPUs, device workers, control, serial, stop).
    pub const VMM_PIDS: u32 = 128;
    /// The hub is one thread.
    pub const HUB_PIDS: u32 = 32;
    /// The kernel's default weight, set explicitly.
    pub const CPU_WEIGHT: u32 = 100;
    /// A VMM's descriptors: virtio_wl vfds (1024 at most) and its devices.
    pub const VMM_NOFILE: u64 = 4096;
    /// The hub holds two descriptors per connection (256 per VM by default), fds in flight
    /// and its VM channels: headroom for its per-VM budgets.
    pub const HUB_NOFILE: u64 = 65536;
    /// Locked memory without VFIO.
    pub const MEMLOCK: u64 = 64 << 10;
}

/// Errors building a jail (in the parent; the service does not start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A path could not be used.
    #[error("jail: {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cgroup could not be made or limited.
    #[error("jail: cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something else (a NUL in a path, a relative path…).
    #[error("jail: {0}")]
    Invalid(String),
}

/// The cgroup limits of one jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// memory.max in bytes.
    pub memory_max: u64,
    /// pids.max.
    pub pids_max: u32,
    /// cpu.weight.
    pub cpu_weight: u32,
}

/// Everything that defines one jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The cgroup's leaf and the hostname: the VM's name, or `hub`.
    pub name: String,
    /// Its uid (never 0).
    pub uid: u32,
    /// Its gid (never 0).
    pub gid: u32,
    /// The program (bound read-only and executable).
    pub program: PathBuf,
    /// Host paths bound read-only at the same place.
    pub read_only: Vec<PathBuf>,
    /// Host paths bound read-write at the same place (the hub's runtime directory).
    pub read_write: Vec<PathBuf>,
    /// Its cgroup's limits.
    pub limits: Limits,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_MEMLOCK unlimited (VFIO pins all guest memory), else [`defaults::MEMLOCK`].
    pub memlock_unlimited: bool,
    /// A procfs of its own PID namespace at `/proc`, read-only (the hub's memfd server
    /// reopens its own descriptors through `/proc/self/fd`); it shows only the process
    /// itself. Without it the jail has no `/proc`.
    pub own_proc: bool,
}

/// The regular files a command line names by absolute path (`/x` or `--opt=/x`): what a
/// program opens by name, bound read-only into its jail. Directories, devices and sockets
/// are never bound by themselves (`read_only` and `fds` in system.toml say those).
pub fn files_named_in(exec: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for arg in exec.iter().skip(1) {
        let path = match arg.split_once('=') {
            Some((opt, p)) if opt.starts_with("--") => p,
            _ => arg.as_str(),
        };
        if !path.starts_with('/') {
            continue;
        }
        let p = PathBuf::from(path);
        if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Guest memory from a VMM command line (`--memory 256M` or `--memory=256M`).
pub fn guest_memory(exec: &[String]) -> u64 {
    let mut it = exec.iter();
    while let Some(a) = it.next() {
        let v = if a == "--memory" {
            it.next().map(String::as_str)
        } else {
            a.strip_prefix("--memory=")
        };
        if let Some(v) = v {
            if let Ok(n) = crate::config::parse_size(v) {
                return n;
            }
        }
    }
    defaults::GUEST_MEMORY
}

impl JailSpec {
    /// The jail of a VM's service: the VM's name, the service's user, guest memory (from
    /// `--memory`) plus the overhead as memory.max, and unlimited locked memory only when
    /// the policy grants it a device (VFIO).
    pub fn for_vm(svc: &crate::config::ServiceConfig, vm: &str, vfio: bool) -> Option<JailSpec> {
        let uid = svc.user?;
        let overhead = svc
            .memory_overhead
            .as_deref()
            .and_then(|m| crate::config::parse_size(m).ok())
            .unwrap_or(defaults::VMM_OVERHEAD);
        let mut read_only = files_named_in(&svc.exec);
        read_only.extend(svc.read_only.iter().cloned());
        Some(JailSpec {
            name: vm.to_string(),
            uid,
            gid: svc.group.unwrap_or(uid),
            program: PathBuf::from(svc.exec.first()?),
            read_only,
            read_write: Vec::new(),
            limits: Limits {
                memory_max: guest_memory(&svc.exec).saturating_add(overhead),
                pids_max: svc.pids_max.unwrap_or(defaults::VMM_PIDS),
                cpu_weight: svc.cpu_weight.unwrap_or(defaults::CPU_WEIGHT),
            },
            nofile: svc.nofile.unwrap_or(defaults::VMM_NOFILE),
            memlock_unlimited: vfio,
            own_proc: false,
        })
    }

    /// The hub's jail: cgroup `hub`, its runtime directory the one writable place, the
    /// files and directories its command line names (policy directories) read-only, and a
    /// procfs of its own PID namespace, read-only: the memfd server makes the read-only
    /// descriptions it hands out, and its probes, by reopening a memfd through
    /// `/proc/self/fd` (there is no other way to a second description of a memfd). Without
    /// a `/proc` every shared-memory allocation failed; init's own (bound before the PID
    /// namespace) showed the hub every process of the host.
    pub fn for_hub(hub: &crate::config::HubConfig) -> Option<JailSpec> {
        let uid = hub.user?;
        let read_write: Vec<PathBuf> = hub.runtime_dir.iter().cloned().collect();
        let mut read_only: Vec<PathBuf> = Vec::new();
        for p in files_named_in(&hub.exec)
            .into_iter()
            .chain(dirs_named_in(&hub.exec))
            .chain(hub.read_only.iter().cloned())
        {
            if !read_write.iter().any(|w| p.starts_with(w)) && !read_only.contains(&p) {
                read_only.push(p);
            }
        }
        Some(JailSpec {
            name: crate::config::HUB_NAME.to_string(),
            uid,
            gid: hub.group.unwrap_or(uid),
            program: PathBuf::from(hub.exec.first()?),
            read_only,
            read_write,
            limits: Limits {
                memory_max: hub
                    .memory_max
                    .as_deref()
                    .and_then(|m| crate::config::parse_size(m).ok())
                    .unwrap_or(defaults::HUB_MEMORY),
                pids_max: hub.pids_max.unwrap_or(defaults::HUB_PIDS),
                cpu_weight: hub.cpu_weight.unwrap_or(defaults::CPU_WEIGHT),
            },
            nofile: hub.nofile.unwrap_or(defaults::HUB_NOFILE),
            memlock_unlimited: false,
            own_proc: true,
        })
    }
}

/// Where a jail's own procfs goes (see [`JailSpec::own_proc`]).
const PROC: &str = "/proc";

/// The directories a command line names by absolute path (the hub's policy directories).
fn dirs_named_in(exec: &[String]) -> Vec<PathBuf> {
    exec.iter()
        .skip(1)
        .filter(|a| a.starts_with('/'))
        .map(PathBuf::from)
        .filter(|p| p != Path::new("/") && p.is_dir())
        .collect()
}

/// One bind mount of the plan.
#[derive(Debug)]
struct Bind {
    /// The source, opened `O_PATH` by the parent.
    _src: OwnedFd,
    /// The source's path (in the child's copy of init's mounts).
    src_proc: CString,
    /// Where it goes below the staging directory.
    target: CString,
    /// The remount flags (read-only or not).
    flags: libc::c_ulong,
}

/// A jail made ready in the parent; [`Prepared::enter`] runs in the child.
#[derive(Debug)]
pub struct Prepared {
    cgroup_procs: Option<OwnedFd>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    staging: CString,
    dirs: Vec<CString>,
    files: Vec<CString>,
    binds: Vec<Bind>,
    hostname: Vec<u8>,
    uid: u32,
    gid: u32,
    bounding: Vec<Capability>,
    landlock: Option<RulesetCreated>,
    /// Where its own procfs is mounted (below the staging directory), if it has one.
    proc_target: Option<CString>,
    /// Descriptors from this number up are closed at exec.
    close_from: u32,
}

impl JailSpec {
    /// Builds the cgroup and the mount plan, and opens what the child needs. `first_free`
    /// is the first descriptor number after the handed-over ones (everything from there up
    /// is closed at exec).
    pub fn prepare(&self, paths: &JailPaths, first_free: RawFd) -> Result<Prepared, JailError> {
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Invalid(format!(
                "{} would run as root (uid {} gid {})",
                self.name, self.uid, self.gid
            )));
        }
        let cgroup_procs = match &paths.cgroup_root {
            Some(root) => Some(cgroup::prepare(root, &self.name, &self.limits)?),
            None => None,
        };
        let mut rlimits = vec![
            (libc::RLIMIT_NOFILE, self.nofile),
            (libc::RLIMIT_CORE, 0),
            (
                libc::RLIMIT_MEMLOCK,
                if self.memlock_unlimited {
                    libc::RLIM_INFINITY
                } else {
                    defaults::MEMLOCK
                },
            ),
        ];
        rlimits.sort();
        std::fs::create_dir_all(&paths.staging).map_err(|source| JailError::Path {
            path: paths.staging.clone(),
            source,
        })?;
        let staging = cstring(paths.staging.as_os_str().as_bytes())?;

        // The mount plan: every bind's target and the directories above it.
        let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
        let mut files: BTreeSet<PathBuf> = BTreeSet::new();
        let mut binds = Vec::new();
        let ro =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        let rw =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        let mut all: Vec<(&Path, libc::c_ulong)> = vec![(self.program.as_path(), ro)];
        all.extend(self.read_only.iter().map(|p| (p.as_path(), ro)));
        all.extend(self.read_write.iter().map(|p| (p.as_path(), rw)));
        let mut seen = BTreeSet::new();
        let mut landlock_rules: Vec<(PathFd, bool, bool)> = Vec::new();
        for (path, flags) in all {
            if !path.is_absolute() || path == Path::new("/") {
                return Err(JailError::Invalid(format!(
                    "{}: only absolute paths other than / are bound into a jail",
                    path.display()
                )));
            }
            if !seen.insert(path.to_path_buf()) {
                continue;
            }
            let src = open_path(path)?;
            let meta = std::fs::metadata(path).map_err(|source| JailError::Path {
                path: path.to_path_buf(),
                source,
            })?;
            let rel = path.strip_prefix("/").unwrap_or(path);
            let target = paths.staging.join(rel);
            for a in target.ancestors().skip(1) {
                if a.starts_with(&paths.staging) && a != paths.staging {
                    dirs.insert(a.to_path_buf());
                }
            }
            if meta.is_dir() {
                dirs.insert(target.clone());
            } else {
                files.insert(target.clone());
            }
            // By name: a descriptor of the parent's would name a mount of init's namespace,
            // which the child, in its own, cannot bind from.
            let src_proc = cstring(path.as_os_str().as_bytes())?;
            let writable = flags & libc::MS_RDONLY == 0;
            if let Ok(fd) = PathFd::new(path) {
                landlock_rules.push((fd, meta.is_dir(), writable));
            }
            binds.push(Bind {
                _src: src,
                src_proc,
                target: cstring(target.as_os_str().as_bytes())?,
                flags,
            });
        }
        // Parents before children (BTreeSet order sorts a path before what is below it).
        let mut dirs = dirs
            .iter()
            .map(|d| cstring(d.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let files = files
            .iter()
            .map(|f| cstring(f.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let bounding = caps::runtime::thread_all_supported().into_iter().collect();
        let proc_target = if self.own_proc {
            let target = paths.staging.join(PROC.trim_start_matches('/'));
            let c = cstring(target.as_os_str().as_bytes())?;
            dirs.push(c.clone());
            Some(c)
        } else {
            None
        };
        Ok(Prepared {
            cgroup_procs,
            rlimits,
            staging,
            dirs,
            files,
            binds,
            hostname: self.name.as_bytes().to_vec(),
            uid: self.uid,
            gid: self.gid,
            bounding,
            landlock: landlock_ruleset(&self.name, landlock_rules),
            proc_target,
            close_from: u32::try_from(first_free).unwrap_or(3),
        })
    }
}

/// The Landlock ruleset: every file access right handled, granted only beneath the bound
/// paths (read and execute, plus everything for a writable one); TCP bind and connect
/// handled with no rule (none); abstract unix sockets and signals scoped to the jail.
/// `None` (logged) where the kernel has no Landlock.
fn landlock_ruleset(name: &str, rules: Vec<(PathFd, bool, bool)>) -> Option<RulesetCreated> {
    let abi = ABI::V6;
    let build = || -> Result<RulesetCreated, landlock::RulesetError> {
        let read = AccessFs::from_read(abi) | AccessFs::Execute;
        let mut created = Ruleset::default()
            .handle_access(AccessFs::from_all(abi))?
            .handle_access(AccessNet::from_all(abi))?
            .scope(Scope::from_all(abi))?
            .create()?;
        for (fd, is_dir, writable) in rules {
            let access = match (is_dir, writable) {
                (_, true) => AccessFs::from_all(abi),
                (true, false) => read,
                (false, false) => read & AccessFs::from_file(abi),
            };
            created = created.add_rule(PathBeneath::new(fd, access))?;
        }
        Ok(created)
    };
    match build() {
        Ok(r) => Some(r),
        Err(e) => {
            warn!("{name}: no Landlock ruleset: {e}");
            None
        }
    }
}

fn cstring(b: &[u8]) -> Result<CString, JailError> {
    CString::new(b).map_err(|_| JailError::Invalid("a path contains a NUL byte".into()))
}

fn open_path(path: &Path) -> Result<OwnedFd, JailError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| JailError::Path {
            path: path.to_path_buf(),
            source,
        })
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Which step of [`Prepared::enter`] failed: the error that reaches init (through the exec
/// error pipe) is the OS error only, so the child keeps the step in its errno's company.
fn step(what: &'static str, r: std::io::Result<()>) -> std::io::Result<()> {
    if r.is_err() {
        // Only the errno crosses back to init through std's exec-error pipe: say which step
        // on stderr (init's pipe from this child), without allocating.
        for part in [
            b"jail: ".as_slice(),
            what.as_bytes(),
            b" failed\n".as_slice(),
        ] {
            // SAFETY: writes a live byte slice to stderr.
            unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
        }
    }
    r
}

impl Prepared {
    /// In the child, between fork and exec (after the handed-over descriptors are in
    /// place): enters the jail. Only system calls on memory prepared by the parent.
    pub fn enter(&mut self) -> std::io::Result<()> {
        // SAFETY: setsid has no memory arguments.
        step("setsid", check(unsafe { libc::setsid() }))?;
        if let Some(fd) = &self.cgroup_procs {
            // SAFETY: writes two bytes from a static buffer to a descriptor we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            step("join cgroup", check(if n == 1 { 0 } else { -1 }))?;
        }
        for (res, value) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: *value,
                rlim_max: *value,
            };
            // SAFETY: setrlimit reads one rlimit from a live local.
            step("setrlimit", check(unsafe { libc::setrlimit(*res, &lim) }))?;
        }
        // From here on this is the service, PID 1 of its own PID namespace (the keeper,
        // outside, never returns).
        step("new PID namespace", keeper::enter())?;
        let flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
        // SAFETY: unshare has no memory arguments.
        step("unshare", check(unsafe { libc::unshare(flags) }))?;
        self.mount_root()?;
        // SAFETY: sethostname reads `len` bytes of a live Vec.
        let r = unsafe { libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()) };
        step("sethostname", check(r))?;
        step("capabilities", self.drop_privileges())?;
        step("parent-death signal", keeper::die_with_keeper())?;
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        step("no_new_privs", check(r))?;
        // SAFETY: close_range with integer arguments; CLOEXEC only marks descriptors.
        let r = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                self.close_from,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        step("close_range", check(if r < 0 { -1 } else { 0 }))?;
        if let Some(mut ruleset) = self.landlock.take() {
            if self.proc_target.is_some() {
                // Its own procfs was mounted here, after the parent made the rules.
                let rule = PathFd::new(PROC).map(|fd| {
                    PathBeneath::new(fd, AccessFs::from_read(ABI::V6) & !AccessFs::Execute)
                });
                ruleset = match rule {
                    Ok(r) => ruleset
                        .add_rule(r)
                        .map_err(|e| std::io::Error::other(format!("landlock: {e}")))?,
                    Err(e) => return Err(std::io::Error::other(format!("landlock: {e}"))),
                };
            }
            if let Err(e) = ruleset.restrict_self() {
                return Err(std::io::Error::other(format!("landlock: {e}")));
            }
        }
        Ok(())
    }

    fn drop_privileges(&self) -> std::io::Result<()> {
        let caps_err = |e: caps::errors::CapsError| std::io::Error::other(e.to_string());
        for c in &self.bounding {
            caps::drop(None, CapSet::Bounding, *c).map_err(caps_err)?;
        }
        caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
        // SAFETY: setgroups with a zero count reads no memory; the others take integers.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
        }
        // The uid switch cleared permitted and effective; inheritable stays unless cleared.
        for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
            caps::clear(None, set).map_err(caps_err)?;
        }
        Ok(())
    }
}

pub mod cgroup;
pub mod keeper;
mod report;
mod root;

pub use report::{exit_note, observe};
