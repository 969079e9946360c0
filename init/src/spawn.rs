//! Starting one child from its recipe: the exclusivity check for shared VFIO devices, the
//! output pipe, the descriptors handed over at exec (see [`crate::handoff`]) and the
//! process itself. What limits the child (its uid and gid, `no_new_privs`, RLIMIT_MEMLOCK,
//! its runtime directory) is kept in the functions at the end of this file, apart from the
//! spawning, so that one module (`jail.rs`) can take it whole.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use bulkhead_vfio::SysfsRoot;
use log::{info, warn};

use crate::handoff::{self, Handoff, Role};
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
}

// ── What limits the child (to move to jail.rs) ───────────────────────────────────────

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
