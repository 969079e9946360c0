//! The supervised children: their recipes and state, starting those that are due,
//! reaping, output pipes and status. The decisions come from [`crate::supervisor`]; this
//! module does the system calls and prints the messages. Spawning one child is
//! [`crate::spawn`], the stop sequence at shutdown [`crate::stop`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{RestartParams, SystemConfig, HUB_NAME};
use crate::control::ServiceStatus;
use crate::handoff::{self, FdSource, Role, ServiceFd};
use crate::jail::{self, JailPaths, JailSpec};
use crate::output::{DrainResult, OutputPipe};
pub use crate::spawn::Recipe;
use crate::supervisor::{ChildId, Decision, ExitKind, Supervisor};

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

/// Every supervised child and its plumbing.
#[derive(Debug)]
pub struct Services {
    pub(crate) sup: Supervisor,
    pub(crate) recipes: Vec<Recipe>,
    pub(crate) pipes: Vec<(String, OutputPipe)>,
    idle_announced: bool,
    /// Where jails live (cgroups, the staging directory of new roots).
    pub(crate) jail_paths: JailPaths,
    /// Per recipe: the cgroup's OOM kills when its current run started.
    pub(crate) oom_base: BTreeMap<usize, u64>,
}

impl Default for Services {
    fn default() -> Self {
        Services {
            sup: Supervisor::default(),
            recipes: Vec::new(),
            pipes: Vec::new(),
            idle_announced: false,
            jail_paths: JailPaths::host(),
            oom_base: BTreeMap::new(),
        }
    }
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
    pub fn from_config(
        config: &SystemConfig,
        vfio_groups: &BTreeMap<String, Vec<u32>>,
        jail_paths: JailPaths,
    ) -> Self {
        let mut s = Services {
            jail_paths,
            ..Services::default()
        };
        let mut pairs = handoff::make_socketpairs(config);
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
                    fds: Vec::new(),
                    jail: JailSpec::for_hub(hub),
                },
                hub.restart_params(),
            );
            s.sup.set_support(id);
        }
        for svc in &config.service {
            let fds = svc
                .fds
                .iter()
                .filter_map(|f| {
                    let source = match (&f.open, &f.socketpair) {
                        (Some(path), _) => FdSource::Open {
                            path: path.clone(),
                            write: f.write,
                        },
                        (None, Some(name)) => {
                            let ends = pairs.get_mut(name)?;
                            if ends.is_empty() {
                                return None;
                            }
                            FdSource::Shared(ends.remove(0))
                        }
                        (None, None) => return None,
                    };
                    Some(ServiceFd {
                        source,
                        arg: f.arg.clone(),
                    })
                })
                .collect();
            let jail = svc.vm.as_ref().and_then(|vm| {
                JailSpec::for_vm(svc, vm, vfio_groups.get(vm).is_some_and(|g| !g.is_empty()))
            });
            let role = match &svc.vm {
                None => Role::Plain,
                Some(vm) => Role::Vm {
                    name: vm.clone(),
                    channel: channels.get(vm).map(|(_, vmm_end)| vmm_end.clone()),
                    vfio_groups: vfio_groups.get(vm).cloned().unwrap_or_default(),
                },
            };
            s.add(
                Recipe {
                    name: svc.name.clone(),
                    exec: svc.exec.clone(),
                    env: svc.environment(),
                    role,
                    user: svc.user.map(|u| (u, svc.group.unwrap_or(u))),
                    runtime_dir: None,
                    fds,
                    jail,
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

    pub(crate) fn report(&mut self, name: &str, decision: Decision) {
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
        match self.jail_note(id, &kind) {
            Some(note) => warn!("{name} {note}"),
            None => info!("{name} {kind}"),
        }
        if matches!(decision, Decision::Ended | Decision::Failed { .. }) {
            self.ended_for_good(id);
        }
        self.report(&name, decision);
        true
    }

    /// The cgroup's OOM kills so far, for a jailed recipe.
    pub(crate) fn oom_kills(&self, recipe: &Recipe) -> u64 {
        match (&recipe.jail, &self.jail_paths.cgroup_root) {
            (Some(j), Some(root)) => jail::cgroup::oom_kills(root, &j.name),
            _ => 0,
        }
    }

    /// A seccomp or OOM kill of a jailed child, in words that name its VM.
    fn jail_note(&self, id: ChildId, kind: &ExitKind) -> Option<String> {
        let spec = self.recipes.get(id.0)?.jail.as_ref()?;
        let signal = match kind {
            ExitKind::Signaled(s) => Some(s.as_str()),
            _ => None,
        };
        jail::exit_note(
            &spec.name,
            signal,
            &self.jail_paths,
            self.oom_base.get(&id.0).copied().unwrap_or(0),
            spec.limits.memory_max,
        )
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
}
