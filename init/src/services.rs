//! Running supervised children: spawning from a recipe, output pipes, reaping, and the
//! stop sequence at shutdown. The decisions come from [`crate::supervisor`]; this module
//! does the system calls and prints the messages.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use bulkhead_vfio::SysfsRoot;

use crate::config::{RestartParams, SystemConfig, HUB_NAME};
use crate::control::ServiceStatus;
use crate::handoff::{self, Handoff, Role};
use crate::output::{DrainResult, OutputPipe};
use crate::supervisor::{ChildId, Decision, ExitKind, State, Supervisor};

/// Most output pipes kept open at once (a pipe outlives its child while grandchildren
/// still hold the write end).
const MAX_PIPES: usize = 256;

/// A monotonic clock measured from init's start.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// Starts now.
    pub fn new() -> Self {
        Clock {
            origin: Instant::now(),
        }
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// How to start one child: the hub, a VMM, or any other service.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Name used in messages and status.
    pub name: String,
    /// Program and arguments.
    pub exec: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// What else it is handed at exec.
    pub role: Role,
    /// Run as this (uid, gid), without supplementary groups.
    pub user: Option<(u32, u32)>,
    /// Created (owned by `user`, mode 0750) before each start.
    pub runtime_dir: Option<std::path::PathBuf>,
}

/// Every supervised child and its plumbing.
#[derive(Debug, Default)]
pub struct Services {
    sup: Supervisor,
    recipes: Vec<Recipe>,
    pipes: Vec<(String, OutputPipe)>,
    idle_announced: bool,
}

/// The exit of a wait status, if it is one.
pub fn exit_kind(status: WaitStatus) -> Option<(i32, ExitKind)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitKind::Exited(code))),
        WaitStatus::Signaled(pid, sig, _) => {
            Some((pid.as_raw(), ExitKind::Signaled(sig.as_str().to_string())))
        }
        _ => None,
    }
}

/// Reaps every exited child (waitpid(-1, WNOHANG) until none is left, bounded), telling
/// `on_exit` each pid and how it ended. Orphans that reparented to us are reaped too.
pub fn reap_exited(mut on_exit: impl FnMut(i32, ExitKind)) {
    for _ in 0..4096 {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(status) => {
                if let Some((pid, kind)) = exit_kind(status) {
                    on_exit(pid, kind);
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("waitpid: {e}");
                return;
            }
        }
    }
}

impl Services {
    /// The children of a system, in start order: the hub first (with one channel per VM),
    /// then the services. `vfio_groups` maps a VM name to the IOMMU groups the policy
    /// grants it (bound to vfio-pci at boot).
    pub fn from_config(config: &SystemConfig, vfio_groups: &BTreeMap<String, Vec<u32>>) -> Self {
        let mut s = Services::default();
        let vm_names: Vec<&str> = config
            .service
            .iter()
            .filter_map(|svc| svc.vm.as_deref())
            .collect();
        let channels = match &config.hub {
            Some(_) => handoff::make_channels(&vm_names),
            None => BTreeMap::new(),
        };
        if let Some(hub) = &config.hub {
            let id = s.add(
                Recipe {
                    name: HUB_NAME.to_string(),
                    exec: hub.exec.clone(),
                    env: hub.environment(),
                    role: Role::Hub {
                        vms: channels
                            .iter()
                            .map(|(n, (hub_end, _))| (n.clone(), hub_end.clone()))
                            .collect(),
                    },
                    user: hub.user.map(|u| (u, hub.group.unwrap_or(u))),
                    runtime_dir: hub.runtime_dir.clone(),
                },
                hub.restart_params(),
            );
            s.sup.set_support(id);
        }
        for svc in &config.service {
            let (exec, role) = match &svc.vm {
                None => (svc.exec.clone(), Role::Plain),
                Some(vm) => {
                    // A VMM's disks are opened by init and handed over as descriptors.
                    let (exec, disks) = handoff::split_disks(&svc.exec);
                    (
                        exec,
                        Role::Vm {
                            name: vm.clone(),
                            channel: channels.get(vm).map(|(_, vmm_end)| vmm_end.clone()),
                            vfio_groups: vfio_groups.get(vm).cloned().unwrap_or_default(),
                            disks,
                        },
                    )
                }
            };
            s.add(
                Recipe {
                    name: svc.name.clone(),
                    exec,
                    env: svc.environment(),
                    role,
                    user: svc.user.map(|u| (u, svc.group.unwrap_or(u))),
                    runtime_dir: None,
                },
                svc.restart_params(),
            );
        }
        s
    }

    /// Adds one child.
    pub fn add(&mut self, recipe: Recipe, params: RestartParams) -> ChildId {
        let id = self.sup.add(&recipe.name, params);
        self.recipes.push(recipe);
        id
    }

    /// The supervisor (read-only).
    pub fn supervisor(&self) -> &Supervisor {
        &self.sup
    }

    /// The earliest pending start.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.sup.next_deadline()
    }

    /// Starts every child whose time has come.
    pub fn start_due(&mut self, clock: &Clock) {
        let now = clock.now();
        for id in self.sup.due(now) {
            let Some(recipe) = self.recipes.get(id.0).cloned() else {
                continue;
            };
            match self.spawn(&recipe) {
                Ok(pid) => {
                    let k = self.sup.started(id, pid, now);
                    info!("started {} pid {pid} (start {k})", recipe.name);
                }
                Err(e) => {
                    error!("{} could not start: {e}", recipe.name);
                    let d = self.sup.spawn_failed(id, e, now);
                    self.report(&recipe.name, d);
                }
            }
        }
    }

    /// The running VM that holds one of `groups` (a device granted with
    /// `shared=exclusive-run` goes to one running VM at a time), if any.
    fn group_holder(&self, me: &str, groups: &[u32]) -> Option<(String, u32)> {
        self.recipes
            .iter()
            .zip(self.sup.children())
            .filter(|(r, (_, child))| r.name != me && child.state.pid().is_some())
            .find_map(|(r, _)| match &r.role {
                Role::Vm { vfio_groups, .. } => groups
                    .iter()
                    .find(|g| vfio_groups.contains(g))
                    .map(|g| (r.name.clone(), *g)),
                _ => None,
            })
    }

    fn spawn(&mut self, recipe: &Recipe) -> Result<i32, String> {
        let (prog, args) = recipe
            .exec
            .split_first()
            .ok_or_else(|| "empty exec".to_string())?;
        if let Role::Vm { vfio_groups, .. } = &recipe.role {
            if let Some((holder, g)) = self.group_holder(&recipe.name, vfio_groups) {
                return Err(format!(
                    "its devices' IOMMU group {g} is in use by {holder}, which is running \
                     (a device shared with shared=exclusive-run goes to one VM at a time)"
                ));
            }
        }
        let (output, write_end) = OutputPipe::open().map_err(|e| format!("pipe: {e}"))?;
        let stderr_end: OwnedFd = write_end.try_clone().map_err(|e| format!("pipe: {e}"))?;
        if let Some(dir) = &recipe.runtime_dir {
            make_runtime_dir(dir, recipe.user)?;
        }
        let handoff = Handoff::for_role(&recipe.role, &SysfsRoot::host())?;
        if !handoff.what.is_empty() {
            info!("{}: handing over {}", recipe.name, handoff.what.join(", "));
        }
        let raw = handoff.raw_fds();
        let mut scratch = vec![0; raw.len()];
        if matches!(recipe.role, Role::Vm { .. }) && recipe.user.is_some() {
            // VFIO pins all guest memory and charges it to RLIMIT_MEMLOCK, which an
            // unprivileged VMM cannot raise: lift it here (init is root; the child inherits).
            lift_memlock_limit();
        }
        let drop_privileges = recipe.user.is_some();
        // A new process group lets shutdown kill what the service itself started.
        let mut cmd = Command::new(prog);
        let sigrtmax = libc::SIGRTMAX();
        // SAFETY: the closure runs between fork and exec and only calls
        // async-signal-safe functions (sigprocmask, signal, prctl, fcntl, dup2) on memory
        // allocated before the fork, allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                crate::signals::reset_in_child(sigrtmax)?;
                if drop_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                handoff::install(&raw, &mut scratch)
            });
        }
        cmd.args(args)
            .args(&handoff.args)
            .env_clear()
            .envs(&recipe.env)
            .envs(handoff.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(stderr_end))
            .process_group(0);
        if let Some((uid, gid)) = recipe.user {
            // std drops the supplementary groups too when it changes the uid as root.
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().map_err(|e| format!("{prog}: {e}"))?;
        let pid = i32::try_from(child.id()).map_err(|_| "pid out of range".to_string())?;
        // The Child handle is not needed: init reaps with waitpid(-1). Init's copies of the
        // handed-over descriptors close here.
        drop(child);
        drop(handoff);
        if self.pipes.len() >= MAX_PIPES {
            warn!("too many output pipes open, dropping the oldest");
            self.pipes.remove(0);
        }
        self.pipes.push((recipe.name.clone(), output));
        Ok(pid)
    }

    fn report(&mut self, name: &str, decision: Decision) {
        match decision {
            Decision::Restart { delay } => {
                info!("{name} restarting in {} ms", delay.as_millis())
            }
            Decision::Failed { burst, interval } => error!(
                "{name} failed: start limit reached ({burst} starts in {} ms)",
                interval.as_millis()
            ),
            Decision::Ended => debug!("{name} ended for good"),
            Decision::Stopped => debug!("{name} stopped"),
        }
    }

    /// Handles one reaped child. Returns false for pids that are not ours (orphans).
    pub fn child_exited(&mut self, pid: i32, kind: ExitKind, clock: &Clock) -> bool {
        let Some((id, decision)) = self.sup.exited(pid, kind.clone(), clock.now()) else {
            return false;
        };
        let name = self
            .sup
            .child(id)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        // Its last words first, then the news of its end.
        self.drain_output_of(&name);
        info!("{name} {kind}");
        if matches!(decision, Decision::Ended | Decision::Failed { .. }) {
            self.ended_for_good(id);
        }
        self.report(&name, decision);
        true
    }

    /// A VMM that will not start again lets go of its hub channel, so the hub sees the VM
    /// leave and forgets its services and connections.
    fn ended_for_good(&mut self, id: ChildId) {
        if let Some(Recipe {
            role: Role::Vm { channel, name, .. },
            ..
        }) = self.recipes.get_mut(id.0)
        {
            if channel.take().is_some() {
                debug!("closed the hub channel of vm {name}");
            }
        }
    }

    /// Reaps every exited child (waitpid(-1, WNOHANG) until none is left).
    pub fn reap(&mut self, clock: &Clock) {
        reap_exited(|pid, kind| {
            if !self.child_exited(pid, kind.clone(), clock) {
                debug!("reaped orphan pid {pid}: {kind}");
            }
        });
    }

    /// True exactly once: the first time every child has ended for good.
    pub fn newly_idle(&mut self) -> bool {
        if self.idle_announced || !self.sup.all_ended() {
            return false;
        }
        self.idle_announced = true;
        true
    }

    /// The output pipes to poll.
    pub fn pipe_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.pipes.iter().map(|(_, p)| p.as_fd()).collect()
    }

    /// Drains the pipes marked readable (same order as `pipe_fds`).
    pub fn drain_output(&mut self, readable: &[bool]) {
        let mut i = 0;
        self.pipes.retain_mut(|(name, pipe)| {
            let ready = readable.get(i).copied().unwrap_or(false);
            i += 1;
            if !ready {
                return true;
            }
            pipe.drain(&mut |line| crate::log::service_line(name, line)) == DrainResult::Open
        });
    }

    fn drain_output_of(&mut self, name: &str) {
        self.pipes.retain_mut(|(owner, pipe)| {
            if owner != name {
                return true;
            }
            pipe.drain(&mut |line| crate::log::service_line(owner, line)) == DrainResult::Open
        });
    }

    /// Status of every child for the control socket.
    pub fn status(&self) -> Vec<ServiceStatus> {
        self.sup
            .children()
            .map(|(_, c)| ServiceStatus {
                name: c.name.clone(),
                state: c.state.name().to_string(),
                pid: c.state.pid(),
                starts: c.starts,
                last_exit: c.last_exit.as_ref().map(|e| e.to_string()),
            })
            .collect()
    }

    /// Shutdown, first stage: each live child in reverse start order gets SIGTERM, then
    /// SIGKILL after its stop timeout. `wait` blocks for at most the given time or until
    /// a signal arrives (the caller's signalfd); output keeps being drained meanwhile.
    pub fn stop_all(&mut self, clock: &Clock, wait: &mut dyn FnMut(&mut Services, Duration)) {
        for (id, pid) in self.sup.begin_stop() {
            let Some(child) = self.sup.child(id) else {
                continue;
            };
            let name = child.name.clone();
            let timeout = child.params.stop_timeout;
            debug!("stopping {name} (pid {pid})");
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            if !self.wait_stopped(id, clock, timeout, wait) {
                warn!("{name} did not stop after SIGTERM, sending SIGKILL");
                let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                if !self.wait_stopped(id, clock, Duration::from_secs(5), wait) {
                    error!("{name} (pid {pid}) still not reaped after SIGKILL");
                }
            }
        }
    }

    fn wait_stopped(
        &mut self,
        id: ChildId,
        clock: &Clock,
        timeout: Duration,
        wait: &mut dyn FnMut(&mut Services, Duration),
    ) -> bool {
        let deadline = clock.now().saturating_add(timeout);
        loop {
            self.reap(clock);
            let stopping = self
                .sup
                .child(id)
                .is_some_and(|c| matches!(c.state, State::Stopping { .. }));
            if !stopping {
                return true;
            }
            let now = clock.now();
            if now >= deadline {
                return false;
            }
            wait(self, deadline - now);
        }
    }
}

/// Sets init's own RLIMIT_MEMLOCK to unlimited (children inherit it). Failure is logged:
/// the VMM then reports the limit itself when VFIO needs more.
fn lift_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one rlimit from a live local.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "cannot lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Creates `dir` (and its parents) and gives it to `user` with mode 0750.
fn make_runtime_dir(dir: &std::path::Path, user: Option<(u32, u32)>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| format!("chown {}: {e}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, groups: &[u32]) -> Recipe {
        Recipe {
            name: name.to_string(),
            exec: vec!["/bin/true".to_string()],
            env: BTreeMap::new(),
            role: Role::Vm {
                name: name.to_string(),
                channel: None,
                vfio_groups: groups.to_vec(),
                disks: Vec::new(),
            },
            user: None,
            runtime_dir: None,
        }
    }

    fn never() -> RestartParams {
        RestartParams {
            policy: crate::config::RestartPolicy::Never,
            delay: Duration::ZERO,
            delay_max: Duration::ZERO,
            stable_after: Duration::ZERO,
            burst: 1,
            burst_interval: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(1),
        }
    }

    /// A device granted to two VMs with shared=exclusive-run: while one runs, the other is
    /// not started and the reason names the holder; once it has ended, the other may start.
    #[test]
    fn a_shared_group_goes_to_one_running_vm_at_a_time() {
        let mut s = Services::default();
        let first = s.add(vm("edu-vm", &[1, 2]), never());
        s.add(vm("second-vm", &[1]), never());
        s.add(vm("other-vm", &[3]), never());
        assert_eq!(s.group_holder("second-vm", &[1]), None);
        s.sup.started(first, 4242, Duration::ZERO);
        assert_eq!(
            s.group_holder("second-vm", &[1]),
            Some(("edu-vm".to_string(), 1))
        );
        assert_eq!(s.group_holder("other-vm", &[3]), None);
        let e = s.spawn(&vm("second-vm", &[1])).unwrap_err();
        assert!(
            e.contains("IOMMU group 1 is in use by edu-vm") && e.contains("exclusive-run"),
            "{e}"
        );
        s.sup
            .exited(4242, ExitKind::Exited(0), Duration::from_secs(1));
        assert_eq!(s.group_holder("second-vm", &[1]), None);
    }
}
