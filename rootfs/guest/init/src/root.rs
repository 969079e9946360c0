//! A guest's Debian root filesystem: the read-only ext4 on its first disk becomes `/`,
//! with the initramfs's Bulkhead binaries at `/usr/local/bin` and its `/etc/bulkhead` at
//! the same place, tmpfs on `/tmp`, and the early filesystems (`/dev`, `/proc`, `/sys`,
//! `/run`) moved across. The guest init stays PID 1 (it is already running and needs
//! nothing from the new root): it moves the new root onto `/` and chroots into it, as
//! `switch_root` does, without deleting the small initramfs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::config::{LOCAL_BIN, ROOT_DEVICE, RUNTIME_DIR};

/// Where the new root is mounted before it becomes `/`.
pub const STAGING: &str = "/sysroot";

/// How long the root disk may take to appear after its modules loaded.
pub const DEVICE_WAIT: Duration = Duration::from_secs(20);

/// Why the switch failed.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{ROOT_DEVICE} did not appear within {0:?} (does the VMM give the guest a disk?)")]
    NoDevice(Duration),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> RootError {
    let what = what.into();
    move |source| RootError::Sys { what, source }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RootError {
    let what = what.into();
    move |source| RootError::Io { what, source }
}

/// Waits up to `limit` for `path` to exist.
pub fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A read-only bind of `src` onto `dst`.
fn bind_ro(src: &str, dst: &Path) -> Result<(), RootError> {
    let what = format!("bind {src} on {}", dst.display());
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(what.clone()))?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(sys(what))
}

/// Mounts the root disk and makes it `/`. On success this process's root and working
/// directory are the new root; the early mounts are at their usual paths in it.
pub fn switch() -> Result<(), RootError> {
    let dev = Path::new(ROOT_DEVICE);
    if !wait_for_path(dev, DEVICE_WAIT) {
        return Err(RootError::NoDevice(DEVICE_WAIT));
    }
    let new = PathBuf::from(STAGING);
    std::fs::create_dir_all(&new).map_err(io(format!("mkdir {STAGING}")))?;
    mount(
        Some(dev),
        &new,
        Some("ext4"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(sys(format!(
        "mount {ROOT_DEVICE} (ext4, read-only) on {STAGING}"
    )))?;
    // Ours, from the initramfs.
    bind_ro("/bin", &new.join(LOCAL_BIN.trim_start_matches('/')))?;
    bind_ro("/etc/bulkhead", &new.join("etc/bulkhead"))?;
    mount(
        Some("tmp"),
        &new.join("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(sys("mount tmpfs on /tmp"))?;
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = new.join(m.trim_start_matches('/'));
        mount(
            Some(m),
            &target,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(sys(format!("move {m} into the new root")))?;
    }
    std::env::set_current_dir(&new).map_err(io(format!("chdir {STAGING}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("move the new root onto /"))?;
    nix::unistd::chroot(".").map_err(sys("chroot"))?;
    std::env::set_current_dir("/").map_err(io("chdir /"))?;
    make_runtime_dir(Path::new(RUNTIME_DIR))
}

/// Creates the programs' `XDG_RUNTIME_DIR` (mode 0700, as the XDG spec wants).
pub fn make_runtime_dir(dir: &Path) -> Result<(), RootError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io(format!("mkdir {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("chmod 0700 {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_dir_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let rt = d.path().join("run/user/0");
        make_runtime_dir(&rt).unwrap();
        let mode = std::fs::metadata(&rt).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn waiting_for_a_path_ends_when_it_appears_or_at_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sock");
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(p2, b"").unwrap();
        });
        assert!(wait_for_path(&p, Duration::from_secs(5)));
        t.join().unwrap();
        assert!(!wait_for_path(
            &d.path().join("never"),
            Duration::from_millis(50)
        ));
    }
}
