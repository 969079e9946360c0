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

use crate::config::{HubFailure, RestartParams, SystemConfig, HUB_NAME};
use crate::handoff::{self, FdSource, Role, ServiceFd};
use crate::jail::{self, JailPaths, JailSpec};
use crate::output::{DrainResult, OutputPipe};
use crate::ring::LogRing;
pub use crate::spawn::Recipe;
use crate::stop::StopTimer;
use crate::supervisor::{ChildId, Decision, ExitKind, State, Supervisor};

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
    /// Output pipes, by recipe index (a pipe outlives its run while grandchildren hold it).
    pub(crate) pipes: Vec<(usize, OutputPipe)>,
    idle_announced: bool,
    /// Where jails live (cgroups, the staging directory of new roots).
    pub(crate) jail_paths: JailPaths,
    /// Per recipe: the cgroup's OOM kills when its current run started.
    pub(crate) oom_base: BTreeMap<usize, u64>,
    /// Stops in progress, by recipe index: when SIGKILL is due.
    pub(crate) stop_timers: BTreeMap<usize, StopTimer>,
    /// Each recipe's log ring.
    pub(crate) rings: Vec<LogRing>,
    /// (lines, bytes) of a new ring.
    pub(crate) ring_limits: (usize, usize),
    /// Lines not yet handed to the persistent log writer.
    pub(crate) persist: Option<crate::persist::Sink>,
    /// Why system.toml was rejected, if it was (answered to `bulkhead-ctl ls`).
    pub config_error: Option<String>,
    /// The hub's control socket, for clients that ask it about connections.
    pub(crate) hub_socket: Option<String>,
    /// The hub, if the system has one.
    pub(crate) hub: Option<ChildId>,
    /// What the VMs do once the hub has failed.
    pub(crate) on_hub_failure: HubFailure,
    /// Ends of the hub's runs so far: a VM registered under an older count restarts once
    /// the hub runs again.
    pub(crate) hub_ends: u64,
    /// Per VM recipe: `hub_ends` when its current run started.
    pub(crate) hub_gen: BTreeMap<usize, u64>,
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
            stop_timers: BTreeMap::new(),
            rings: Vec::new(),
            ring_limits: (1000, 64 << 10),
            persist: None,
            config_error: None,
            hub_socket: None,
            hub: None,
            on_hub_failure: HubFailure::default(),
            hub_ends: 0,
            hub_gen: BTreeMap::new(),
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
            ring_limits: (config.log.ring_lines as usize, config.log.ring_bytes()),
            hub_socket: config
                .hub
                .as_ref()
                .and_then(|h| h.control_socket())
                .map(|p| p.display().to_string()),
            on_hub_failure: config
                .hub
                .as_ref()
                .map(|h| h.on_failure)
                .unwrap_or_default(),
            ..Services::default()
        };
        if let Some(dir) = &config.log.dir {
            s.add_log_writer(config, dir);
        }
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
            s.hub = Some(id);
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
                    fds,
                    jail,
                },
                svc.restart_params(),
            );
        }
        s
    }

    /// The log writer (`bulkhead-init logd`, see [`crate::persist`]): a support child
    /// started before the hub (so stopped after it), fed through a pipe init writes to
    /// without blocking.
    fn add_log_writer(&mut self, config: &SystemConfig, dir: &std::path::Path) {
        let (sink, read_end) = match crate::persist::pipe() {
            Ok(p) => p,
            Err(e) => {
                error!("cannot make the log writer's pipe: {e}; logs stay in memory");
                return;
            }
        };
        let me = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "/bin/bulkhead-init".into());
        let mut exec = vec![me];
        exec.extend(crate::persist::writer_args(&config.log, dir));
        let id = self.add(
            Recipe {
                name: crate::persist::LOGD_NAME.to_string(),
                exec,
                env: BTreeMap::from([("PATH".to_string(), "/bin".to_string())]),
                role: Role::Plain,
                user: None,
                runtime_dir: None,
                fds: vec![ServiceFd {
                    source: FdSource::Shared(std::sync::Arc::new(read_end)),
                    arg: "--input-fd={fd}".into(),
                }],
                jail: None,
            },
            RestartParams {
                policy: crate::config::RestartPolicy::Always,
                delay: Duration::from_millis(200),
                delay_max: Duration::from_secs(10),
                stable_after: Duration::from_secs(30),
                burst: 10,
                burst_interval: Duration::from_secs(60),
                stop_timeout: Duration::from_secs(5),
            },
        );
        self.sup.set_support(id);
        self.persist = Some(sink);
    }

    /// Adds one child.
    pub fn add(&mut self, recipe: Recipe, params: RestartParams) -> ChildId {
        let id = self.sup.add(&recipe.name, params);
        self.recipes.push(recipe);
        self.rings
            .push(LogRing::new(self.ring_limits.0, self.ring_limits.1));
        id
    }

    /// Appends init's own line about child `id` to its log ring (and the persistent log).
    pub(crate) fn note(&mut self, id: ChildId, text: &str) {
        let (boot, unix) = crate::ring::now_stamps();
        let text = text.as_bytes();
        let text = text
            .get(..text.len().min(crate::output::MAX_LINE))
            .unwrap_or(text);
        if let Some(ring) = self.rings.get_mut(id.0) {
            ring.push(text, true, boot, unix);
        }
        if let (Some(sink), Some(r)) = (self.persist.as_mut(), self.recipes.get(id.0)) {
            sink.line(&r.name, true, boot, unix, text);
        }
    }

    /// The supervisor (read-only).
    pub fn supervisor(&self) -> &Supervisor {
        &self.sup
    }

    /// The earliest pending start or SIGKILL.
    pub fn next_deadline(&self) -> Option<Duration> {
        match (self.sup.next_deadline(), self.next_stop_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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
                    self.note(id, &format!("started pid {pid} (start {k})"));
                    self.after_start(id, &recipe, now);
                }
                Err(e) => {
                    error!("{} could not start: {e}", recipe.name);
                    self.note(id, &format!("could not start: {e}"));
                    let d = self.sup.spawn_failed(id, e, now);
                    self.report(id, d);
                }
            }
        }
    }

    pub(crate) fn report(&mut self, id: ChildId, decision: Decision) {
        let name = self
            .sup
            .child(id)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let line = match decision {
            Decision::Restart { delay } => {
                let l = format!("restarting in {} ms", delay.as_millis());
                info!("{name} {l}");
                l
            }
            Decision::Failed { burst, interval } => {
                let l = format!(
                    "failed: start limit reached ({burst} starts in {} ms)",
                    interval.as_millis()
                );
                error!("{name} {l}");
                l
            }
            Decision::Ended => {
                debug!("{name} ended for good");
                "ended for good".into()
            }
            Decision::Stopped => {
                let held = self.sup.child(id).is_some_and(|c| c.state == State::Held);
                let l = if held {
                    "stopped; held until the hub runs again"
                } else {
                    "stopped"
                };
                info!("{name} {l}");
                l.into()
            }
            Decision::Restarting => {
                info!("{name} stopped; starting it again");
                "stopped; starting it again".into()
            }
        };
        self.note(id, &line);
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
        self.drain_output_of(id.0);
        let how = match self.jail_note(id, &kind) {
            Some(note) => {
                warn!("{name} {note}");
                note
            }
            None => {
                info!("{name} {kind}");
                kind.to_string()
            }
        };
        self.note(id, &how);
        if matches!(decision, Decision::Ended | Decision::Failed { .. }) {
            self.ended_for_good(id);
        }
        let failed = matches!(decision, Decision::Failed { .. });
        self.report(id, decision);
        if Some(id) == self.hub {
            self.hub_ended(failed, clock.now());
        }
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

    /// True once each time every child has ended for good (again after something was
    /// started since).
    pub fn newly_idle(&mut self) -> bool {
        if !self.sup.all_ended() {
            self.idle_announced = false;
            return false;
        }
        if self.idle_announced {
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
        let recipes = &self.recipes;
        let rings = &mut self.rings;
        let persist = &mut self.persist;
        self.pipes.retain_mut(|(owner, pipe)| {
            let ready = readable.get(i).copied().unwrap_or(false);
            i += 1;
            if !ready {
                return true;
            }
            let name = recipes.get(*owner).map_or("?", |r| r.name.as_str());
            let ring = rings.get_mut(*owner);
            pipe.drain(&mut line_sink(name, ring, persist.as_mut())) == DrainResult::Open
        });
    }

    fn drain_output_of(&mut self, index: usize) {
        let recipes = &self.recipes;
        let rings = &mut self.rings;
        let persist = &mut self.persist;
        self.pipes.retain_mut(|(owner, pipe)| {
            if *owner != index {
                return true;
            }
            let name = recipes.get(*owner).map_or("?", |r| r.name.as_str());
            let ring = rings.get_mut(*owner);
            pipe.drain(&mut line_sink(name, ring, persist.as_mut())) == DrainResult::Open
        });
    }
}

/// Where one line of a service's output goes: the console (`<name>: <line>`, dropped if
/// the console is busy), its ring, and the persistent log writer if there is one.
fn line_sink<'a>(
    name: &'a str,
    mut ring: Option<&'a mut LogRing>,
    mut persist: Option<&'a mut crate::persist::Sink>,
) -> impl FnMut(&[u8]) + 'a {
    move |line: &[u8]| {
        crate::log::service_line(name, line);
        let (boot, unix) = crate::ring::now_stamps();
        if let Some(r) = ring.as_deref_mut() {
            r.push(line, false, boot, unix);
        }
        if let Some(p) = persist.as_deref_mut() {
            p.line(name, false, boot, unix, line);
        }
    }
}
