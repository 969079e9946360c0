//! The guest's programs: started once at boot (a program with `wait_for` once its path
//! exists), each in its own process group with its stdout and stderr on one pipe that init
//! turns into `<name>: <line>` console lines; reaped with waitpid(-1), so orphans that
//! reparent to PID 1 are reaped too.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use bulkhead_init::output::{DrainResult, OutputPipe};
use bulkhead_init::services::reap_exited;
use bulkhead_init::supervisor::ExitKind;
use log::{debug, error, info};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::{GuestConfig, Program, PROGRAM_PATH, RUNTIME_DIR};

/// One program and what is left of it.
#[derive(Debug)]
struct Running {
    name: String,
    /// Waiting for its `wait_for` path: how to start it then.
    waiting: Option<(Program, std::path::PathBuf)>,
    /// Its pid (and process group) while it runs.
    pid: Option<i32>,
    /// Its output until the last writer closed it.
    output: Option<OutputPipe>,
    /// How it ended, once it has.
    ended: Option<ExitKind>,
}

/// The guest's programs.
#[derive(Debug, Default)]
pub struct Programs {
    list: Vec<Running>,
    /// Environment every program gets before its own `env` (a guest with packages:
    /// `XDG_RUNTIME_DIR`, `HOME` and `XDG_CACHE_HOME`).
    base_env: Vec<(String, String)>,
}

impl Programs {
    /// Starts every program of `config`, in order, except those waiting for a path (see
    /// [`Programs::start_ready`]). One that cannot start is logged and counts as ended.
    pub fn start(config: &GuestConfig) -> Programs {
        let base_env = if config.has_root() {
            vec![
                ("XDG_RUNTIME_DIR".to_string(), RUNTIME_DIR.to_string()),
                ("HOME".to_string(), "/root".to_string()),
                // The root filesystem is read-only: caches (fontconfig's) go to tmpfs.
                ("XDG_CACHE_HOME".to_string(), "/tmp".to_string()),
            ]
        } else {
            Vec::new()
        };
        let mut programs = Programs {
            list: Vec::new(),
            base_env,
        };
        for p in &config.program {
            let r = match &p.wait_for {
                Some(path) if !std::path::Path::new(path).exists() => {
                    info!("{} waits for {path}", p.name);
                    Running {
                        name: p.name.clone(),
                        waiting: Some((p.clone(), path.into())),
                        pid: None,
                        output: None,
                        ended: None,
                    }
                }
                _ => programs.launch(p),
            };
            programs.list.push(r);
        }
        programs
    }

    fn launch(&self, p: &Program) -> Running {
        match spawn(p, &self.base_env, libc::SIGRTMAX()) {
            Ok((pid, output)) => {
                info!("started {} pid {pid}", p.name);
                Running {
                    name: p.name.clone(),
                    waiting: None,
                    pid: Some(pid),
                    output: Some(output),
                    ended: None,
                }
            }
            Err(e) => {
                error!("{} could not start: {e}", p.name);
                Running {
                    name: p.name.clone(),
                    waiting: None,
                    pid: None,
                    output: None,
                    ended: Some(ExitKind::SpawnFailed(e)),
                }
            }
        }
    }

    /// True while some program waits for its path.
    pub fn any_waiting(&self) -> bool {
        self.list.iter().any(|r| r.waiting.is_some())
    }

    /// Starts the waiting programs whose path now exists.
    pub fn start_ready(&mut self) {
        for i in 0..self.list.len() {
            let ready = self
                .list
                .get(i)
                .and_then(|r| r.waiting.as_ref())
                .is_some_and(|(_, path)| path.exists());
            if !ready {
                continue;
            }
            let Some((p, _)) = self.list.get_mut(i).and_then(|r| r.waiting.take()) else {
                continue;
            };
            let started = self.launch(&p);
            if let Some(slot) = self.list.get_mut(i) {
                *slot = started;
            }
        }
    }

    /// Gives up on the programs still waiting (the VM is stopping): they count as ended.
    pub fn cancel_waiting(&mut self) {
        for r in &mut self.list {
            if let Some((_, path)) = r.waiting.take() {
                info!(
                    "{} never started ({} did not appear)",
                    r.name,
                    path.display()
                );
                r.ended = Some(ExitKind::SpawnFailed(format!(
                    "{} did not appear",
                    path.display()
                )));
            }
        }
    }

    /// The output pipes still open, in a fixed order (see [`Programs::drain`]).
    pub fn pipe_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.list
            .iter()
            .filter_map(|r| r.output.as_ref().map(|o| o.as_fd()))
            .collect()
    }

    /// Drains the pipes `ready` marks (in [`Programs::pipe_fds`] order) to the console.
    pub fn drain(&mut self, ready: &[bool]) {
        let open = self.list.iter_mut().filter(|r| r.output.is_some());
        for (r, go) in open.zip(ready) {
            if !go {
                continue;
            }
            let name = r.name.clone();
            if let Some(pipe) = r.output.as_mut() {
                let mut emit = |line: &[u8]| bulkhead_init::log::service_line(&name, line);
                if pipe.drain(&mut emit) == DrainResult::Eof {
                    r.output = None;
                }
            }
        }
    }

    /// Reaps every exited child: a program's end is logged, an orphan's is not.
    pub fn reap(&mut self) {
        reap_exited(
            |pid, kind| match self.list.iter_mut().find(|r| r.pid == Some(pid)) {
                Some(r) => {
                    info!("{} {kind}", r.name);
                    r.pid = None;
                    r.ended = Some(kind);
                }
                None => debug!("reaped orphan pid {pid}: {kind}"),
            },
        );
    }

    /// True once every program has ended and its output has been read to the end.
    pub fn all_ended(&self) -> bool {
        self.list
            .iter()
            .all(|r| r.ended.is_some() && r.output.is_none())
    }

    /// True while a program's process is alive (its output may still be open by others) or
    /// a program still waits to start.
    pub fn any_running(&self) -> bool {
        self.list
            .iter()
            .any(|r| r.pid.is_some() || r.waiting.is_some())
    }

    /// Sends `sig` to the process group of every program still running.
    pub fn signal_all(&self, sig: Signal) {
        for pid in self.list.iter().filter_map(|r| r.pid) {
            if let Err(e) = kill(Pid::from_raw(-pid), sig) {
                debug!("kill(-{pid}, {sig}): {e}");
            }
        }
    }

    /// How each program ended, in start order (`None` while it runs).
    pub fn outcomes(&self) -> Vec<(&str, Option<&ExitKind>)> {
        self.list
            .iter()
            .map(|r| (r.name.as_str(), r.ended.as_ref()))
            .collect()
    }

    /// Forgets the output pipes (at shutdown, when their writers may never close).
    pub fn close_outputs(&mut self) {
        for r in &mut self.list {
            r.output = None;
        }
    }
}

fn spawn(
    p: &Program,
    base_env: &[(String, String)],
    sigrtmax: i32,
) -> Result<(i32, OutputPipe), String> {
    let (prog, args) = p
        .exec
        .split_first()
        .ok_or_else(|| "empty exec".to_string())?;
    let (output, write_end) = OutputPipe::open().map_err(|e| format!("pipe: {e}"))?;
    let stderr_end = write_end.try_clone().map_err(|e| format!("pipe: {e}"))?;
    let mut cmd = Command::new(prog);
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe
    // functions (sigprocmask, signal) on its own stack, allocating nothing.
    unsafe {
        cmd.pre_exec(move || bulkhead_init::signals::reset_in_child(sigrtmax));
    }
    cmd.args(args)
        .env_clear()
        .env("PATH", PROGRAM_PATH)
        .envs(base_env.iter().map(|(k, v)| (k, v)))
        .envs(&p.env)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(stderr_end))
        .process_group(0);
    let child = cmd.spawn().map_err(|e| format!("{prog}: {e}"))?;
    let pid = i32::try_from(child.id()).map_err(|_| "pid out of range".to_string())?;
    // Reaped with waitpid(-1); the handle is not needed.
    drop(child);
    Ok((pid, output))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // These tests spawn real children and reap with waitpid(-1), which would also take
    // another test's children: they run one at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn config(programs: &str) -> GuestConfig {
        GuestConfig::parse(programs, Path::new("guest.toml")).unwrap()
    }

    fn run_to_end(p: &mut Programs) {
        for _ in 0..2000 {
            p.reap();
            let ready = vec![true; p.pipe_fds().len()];
            p.drain(&ready);
            if p.all_ended() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("programs did not end: {:?}", p.outcomes());
    }

    #[test]
    fn programs_run_and_their_ends_are_recorded() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let mut p = Programs::start(&config(
            r#"
            [[program]]
            name = "ok"
            exec = ["/bin/sh", "-c", "echo hello; echo err >&2"]
            [[program]]
            name = "fails"
            exec = ["/bin/sh", "-c", "exit 7"]
            [[program]]
            name = "missing"
            exec = ["/nonexistent/program"]
            "#,
        ));
        run_to_end(&mut p);
        let got = p.outcomes();
        assert_eq!(got[0], ("ok", Some(&ExitKind::Exited(0))));
        assert_eq!(got[1], ("fails", Some(&ExitKind::Exited(7))));
        assert!(
            matches!(got[2], ("missing", Some(ExitKind::SpawnFailed(e))) if e.contains("/nonexistent/program")),
            "{got:?}"
        );
    }

    #[test]
    fn a_program_waits_for_its_path() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("ready");
        let mut p = Programs::start(&config(&format!(
            r#"
            [[program]]
            name = "first"
            exec = ["/bin/sh", "-c", "sleep 0.3; echo x > {}"]
            [[program]]
            name = "second"
            exec = ["/bin/sh", "-c", "exit 3"]
            wait_for = "{}"
            "#,
            flag.display(),
            flag.display()
        )));
        assert!(p.any_waiting());
        for _ in 0..2000 {
            p.reap();
            p.start_ready();
            let ready = vec![true; p.pipe_fds().len()];
            p.drain(&ready);
            if p.all_ended() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!p.any_waiting());
        assert_eq!(p.outcomes()[1], ("second", Some(&ExitKind::Exited(3))));
        // One that never gets its path counts as ended once the VM stops.
        let mut q = Programs::start(&config(
            "[[program]]\nname = \"w\"\nexec = [\"/bin/true\"]\nwait_for = \"/nonexistent/x\"\n",
        ));
        assert!(q.any_running() && !q.all_ended());
        q.cancel_waiting();
        assert!(q.all_ended());
    }

    #[test]
    fn a_stop_reaches_the_whole_process_group() {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        // The program's own child keeps the output pipe open; SIGTERM to the group ends both.
        let mut p = Programs::start(&config(
            r#"
            [[program]]
            name = "sleeper"
            exec = ["/bin/sh", "-c", "sleep 60 & sleep 60; wait"]
            "#,
        ));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(p.any_running());
        p.signal_all(Signal::SIGTERM);
        run_to_end(&mut p);
        assert_eq!(
            p.outcomes()[0],
            ("sleeper", Some(&ExitKind::Signaled("SIGTERM".into())))
        );
    }
}
