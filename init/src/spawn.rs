//! Starting one child from its recipe: the exclusivity check for shared VFIO devices, the
//! output pipe, the descriptors handed over at exec (see [`crate::handoff`]) and the
//! process itself. What limits a VMM or the hub (uid and gid, capabilities, namespaces,
//! cgroup, rlimits, Landlock) is `crate::jail`, prepared here and entered in the child.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use bulkhead_vfio::SysfsRoot;
use log::{info, warn};

use crate::handoff::{self, Handoff, Role, ServiceFd};
use crate::jail::{self, JailSpec};
use crate::output::OutputPipe;
use crate::services::Services;

/// Most output pipes kept open at once (a pipe outlives its child while grandchildren
/// still hold the write end).
const MAX_PIPES: usize = 256;

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
    /// Descriptors of its own (`fds` in system.toml), after those of its role.
    pub fds: Vec<ServiceFd>,
    /// The jail it runs in (a VMM or the hub, see [`crate::jail`]); `user` is the jail's.
    pub jail: Option<JailSpec>,
}

impl Services {
    /// The running VM that holds one of `groups` (a device granted with
    /// `shared=exclusive-run` goes to one running VM at a time), if any.
    pub(crate) fn group_holder(&self, me: &str, groups: &[u32]) -> Option<(String, u32)> {
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

    /// Starts `recipe` once; returns the pid.
    pub(crate) fn spawn(&mut self, recipe: &Recipe) -> Result<i32, String> {
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
        let mut handoff = Handoff::for_role(&recipe.role, &SysfsRoot::host())?;
        handoff.add_service_fds(&recipe.fds)?;
        if !handoff.what.is_empty() {
            info!("{}: handing over {}", recipe.name, handoff.what.join(", "));
        }
        let raw = handoff.raw_fds();
        let mut scratch = vec![0; raw.len()];
        let first_free = handoff::FIRST_FD + raw.len() as i32;
        let mut jailed = match &recipe.jail {
            Some(spec) => Some(
                spec.prepare(&self.jail_paths, first_free)
                    .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let drop_privileges = recipe.user.is_some();
        let mut cmd = Command::new(prog);
        let sigrtmax = libc::SIGRTMAX();
        // SAFETY: the closure runs between fork and exec. It only makes system calls on
        // memory prepared before the fork (the signal reset, prctl, fcntl, dup2, and the
        // jail's calls in `Prepared::enter`); init is single-threaded, so even the `caps`
        // crate's calls there cannot meet a lock another thread held at the fork.
        unsafe {
            cmd.pre_exec(move || {
                crate::signals::reset_in_child(sigrtmax)?;
                handoff::install(&raw, &mut scratch)?;
                match jailed.as_mut() {
                    Some(j) => j.enter(),
                    None => {
                        if drop_privileges
                            && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    }
                }
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
            .stderr(Stdio::from(stderr_end));
        if recipe.jail.is_none() {
            // A new process group lets shutdown kill what the service itself started (a
            // jail makes a new session, which is one too).
            cmd.process_group(0);
            if let Some((uid, gid)) = recipe.user {
                // std drops the supplementary groups too when it changes the uid as root.
                cmd.uid(uid).gid(gid);
            }
        }
        let oom_before = self.oom_kills(recipe);
        // Std's exec-error pipe must not land on a number the handed-over descriptors
        // are moved to in the child (see `Handoff::reserve_targets`).
        let reserved = handoff.reserve_targets().map_err(|e| e.to_string())?;
        let spawned = cmd.spawn();
        drop(reserved);
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                // A jail step that failed said which on the child's stderr: show it.
                drop(cmd);
                let mut output = output;
                output.drain(&mut |line| crate::log::service_line(&recipe.name, line));
                return Err(format!("{prog}: {e}"));
            }
        };
        let pid = i32::try_from(child.id()).map_err(|_| "pid out of range".to_string())?;
        if recipe.jail.is_some() {
            // What the kernel says of it, once exec has succeeded (spawn waited for that).
            // The process init started is the jail's keeper; the service is its child,
            // PID 1 of its own PID namespace (see `jail::keeper`).
            match jail::keeper::service_of(pid).and_then(|s| Some((s, jail::observe(s)?))) {
                Some((service, seen)) => {
                    info!(
                        "{} jailed: {seen} (pid {service}; its keeper {pid})",
                        recipe.name
                    )
                }
                None => warn!("{} jailed, but gone before init could look", recipe.name),
            }
            if let Some(i) = self.recipes.iter().position(|r| r.name == recipe.name) {
                self.oom_base.insert(i, oom_before);
            }
        }
        // The Child handle is not needed: init reaps with waitpid(-1). Init's copies of the
        // handed-over descriptors close here.
        drop(child);
        drop(handoff);
        if self.pipes.len() >= MAX_PIPES {
            warn!("too many output pipes open, dropping the oldest");
            self.pipes.remove(0);
        }
        let index = self
            .recipes
            .iter()
            .position(|r| r.name == recipe.name)
            .unwrap_or(usize::MAX);
        self.pipes.push((index, output));
        Ok(pid)
    }
}

// ── The hub's runtime directory (the rest of what limits a child is in jail/) ─────────

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
    use crate::config::RestartParams;
    use crate::supervisor::ExitKind;
    use std::time::Duration;

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
            fds: Vec::new(),
            jail: None,
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
