//! The cgroup of one jail: `/sys/fs/cgroup/bulkhead/<name>` with its limits, joined by the
//! child; the OOM kills counted from its `memory.events`.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use log::warn;

use super::{JailError, Limits, CGROUP_PARENT};

fn err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(err(path))
}

/// `<root>/bulkhead/<name>`.
pub fn dir(root: &Path, name: &str) -> PathBuf {
    root.join(CGROUP_PARENT).join(name)
}

/// Enables the memory, pids and cpu controllers for `<root>/bulkhead` and its children.
pub fn setup(root: &Path) -> Result<(), JailError> {
    let parent = root.join(CGROUP_PARENT);
    std::fs::create_dir_all(&parent).map_err(err(&parent))?;
    for dir in [root, parent.as_path()] {
        write(&dir.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
    }
    Ok(())
}

/// Makes (or reuses) the jail's cgroup, kills what an earlier run left in it, writes
/// its limits and opens its `cgroup.procs` for the child to join.
pub fn prepare(root: &Path, name: &str, limits: &Limits) -> Result<OwnedFd, JailError> {
    if !root
        .join(CGROUP_PARENT)
        .join("cgroup.subtree_control")
        .exists()
    {
        setup(root)?;
    }
    let dir = dir(root, name);
    std::fs::create_dir_all(&dir).map_err(err(&dir))?;
    let procs = dir.join("cgroup.procs");
    let leftovers = std::fs::read_to_string(&procs).map_err(err(&procs))?;
    if !leftovers.trim().is_empty() {
        warn!("cgroup of {name} still has processes from an earlier run: killing them");
        write(&dir.join("cgroup.kill"), "1")?;
    }
    write(&dir.join("memory.max"), &limits.memory_max.to_string())?;
    write(&dir.join("memory.swap.max"), "0")?;
    write(&dir.join("memory.oom.group"), "1")?;
    write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
    write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&procs)
        .map(OwnedFd::from)
        .map_err(err(&procs))
}

/// `oom_kill` of the cgroup's memory.events (0 when it cannot be read).
pub fn oom_kills(root: &Path, name: &str) -> u64 {
    let path = dir(root, name).join("memory.events");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
