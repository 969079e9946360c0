//! The early filesystems: proc, sysfs, devtmpfs, devpts, /dev/shm, /run, cgroup2.
//!
//! Mounting is idempotent: a target that is already a mount point (its device differs
//! from its parent's) is left alone. Failures are logged, never fatal. The list of what
//! init mounted is kept so shutdown can unmount in reverse.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use log::{debug, error};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// One mount.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    /// Source (device or fs name).
    pub source: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Filesystem type.
    pub fstype: &'static str,
    /// Flags.
    pub flags: MsFlags,
    /// fs-specific options.
    pub data: Option<&'static str>,
    /// Directory mode if it must be created.
    pub mode: u32,
}

/// The early mounts, in order.
pub fn early_mounts() -> Vec<MountSpec> {
    let nse = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    vec![
        MountSpec {
            source: "proc",
            target: "/proc",
            fstype: "proc",
            flags: nse,
            data: None,
            mode: 0o555,
        },
        MountSpec {
            source: "sysfs",
            target: "/sys",
            fstype: "sysfs",
            flags: nse,
            data: None,
            mode: 0o555,
        },
        MountSpec {
            source: "devtmpfs",
            target: "/dev",
            fstype: "devtmpfs",
            flags: MsFlags::MS_NOSUID,
            data: Some("mode=0755"),
            mode: 0o755,
        },
        MountSpec {
            source: "devpts",
            target: "/dev/pts",
            fstype: "devpts",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            data: Some("gid=5,mode=620,ptmxmode=666"),
            mode: 0o755,
        },
        MountSpec {
            source: "shm",
            target: "/dev/shm",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=1777"),
            mode: 0o1777,
        },
        MountSpec {
            source: "run",
            target: "/run",
            fstype: "tmpfs",
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            data: Some("mode=0755"),
            mode: 0o755,
        },
        MountSpec {
            source: "cgroup2",
            target: "/sys/fs/cgroup",
            fstype: "cgroup2",
            flags: nse,
            data: None,
            mode: 0o755,
        },
    ]
}

/// True if `path` is a mount point: its device differs from its parent's (the root is
/// always one).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    match path.parent() {
        None => true,
        Some(parent) => std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev()),
    }
}

/// Mounts everything in `specs` that is not mounted yet; returns the targets it mounted.
pub fn mount_all(specs: &[MountSpec]) -> Vec<PathBuf> {
    let mut mounted = Vec::new();
    for spec in specs {
        let target = Path::new(spec.target);
        if is_mount_point(target) {
            debug!("{} already mounted", spec.target);
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(target) {
            error!("cannot create {}: {e}", spec.target);
            continue;
        }
        if let Err(e) = std::fs::set_permissions(
            target,
            std::os::unix::fs::PermissionsExt::from_mode(spec.mode),
        ) {
            debug!("chmod {}: {e}", spec.target);
        }
        match mount(
            Some(spec.source),
            target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        ) {
            Ok(()) => {
                debug!("mounted {} on {}", spec.fstype, spec.target);
                mounted.push(target.to_path_buf());
            }
            Err(nix::errno::Errno::EBUSY) => debug!("{} already mounted", spec.target),
            Err(e) => error!("cannot mount {} on {}: {e}", spec.fstype, spec.target),
        }
    }
    // /dev/ptmx → pts/ptmx, as devpts with ptmxmode expects.
    let ptmx = Path::new("/dev/ptmx");
    if mounted.iter().any(|m| m == Path::new("/dev/pts")) && !ptmx.exists() {
        if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", ptmx) {
            debug!("symlink /dev/ptmx: {e}");
        }
    }
    mounted
}

/// Unmounts `mounted` in reverse order, falling back to a lazy (MNT_DETACH) unmount.
pub fn unmount_all(mounted: &[PathBuf]) {
    for target in mounted.iter().rev() {
        if let Err(e) = umount2(target.as_path(), MntFlags::empty()) {
            debug!("umount {}: {e}; detaching instead", target.display());
            if let Err(e) = umount2(target.as_path(), MntFlags::MNT_DETACH) {
                error!("cannot unmount {}: {e}", target.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_parents_first() {
        let specs = early_mounts();
        let pos = |t: &str| specs.iter().position(|s| s.target == t).unwrap();
        assert!(pos("/dev") < pos("/dev/pts"));
        assert!(pos("/dev") < pos("/dev/shm"));
        assert!(pos("/sys") < pos("/sys/fs/cgroup"));
    }

    #[test]
    fn mount_points() {
        assert!(is_mount_point(Path::new("/")));
        assert!(is_mount_point(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
        assert!(!is_mount_point(&dir.path().join("missing")));
    }
}
