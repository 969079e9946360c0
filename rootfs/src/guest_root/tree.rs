//! The directory tree of a guest's root filesystem: every package of the closure unpacked
//! with `dpkg-deb -x` (no maintainer scripts run: the guest's programs need files, not a
//! configured system), `/usr` merged the way Debian's own installs are (so packages built
//! for either layout work, and `/lib64/ld-linux-x86-64.so.2` is always there), what a
//! running guest never reads removed (documentation, manuals, translations), and the
//! mount points and account files Bulkhead's guest init expects.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::RootError;

/// Top-level directories Debian keeps under `/usr` (`/bin` → `usr/bin`, …).
pub const MERGED_DIRS: &[&str] = &["bin", "sbin", "lib", "lib64"];

/// What a guest never reads: removed after unpacking to keep the image small.
pub const PRUNED: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/gtk-doc",
    "usr/share/help",
];

/// Directories the guest init mounts on or binds into, created in every image.
pub const MOUNT_POINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("var/tmp", 0o1777),
    ("etc/bulkhead", 0o755),
    ("usr/local/bin", 0o755),
];

/// Unpacks each `.deb` into `root`.
pub fn unpack(debs: &[PathBuf], root: &Path) -> Result<(), RootError> {
    std::fs::create_dir_all(root).map_err(RootError::io(root))?;
    for deb in debs {
        super::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    Ok(())
}

/// Moves `src`'s entries into `dst` (created if missing), merging directories; an entry
/// present in both that is not a directory on both sides keeps `dst`'s unless `src`'s is a
/// regular file and `dst`'s a symlink to it (Debian's compat links).
fn merge_into(src: &Path, dst: &Path) -> Result<(), RootError> {
    std::fs::create_dir_all(dst).map_err(RootError::io(dst))?;
    for entry in std::fs::read_dir(src).map_err(RootError::io(src))? {
        let entry = entry.map_err(RootError::io(src))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let from_meta = std::fs::symlink_metadata(&from).map_err(RootError::io(&from))?;
        match std::fs::symlink_metadata(&to) {
            Err(_) => std::fs::rename(&from, &to).map_err(RootError::io(&from))?,
            Ok(to_meta) if to_meta.is_dir() && from_meta.is_dir() => merge_into(&from, &to)?,
            Ok(to_meta) if to_meta.file_type().is_symlink() && from_meta.is_file() => {
                std::fs::remove_file(&to).map_err(RootError::io(&to))?;
                std::fs::rename(&from, &to).map_err(RootError::io(&from))?;
            }
            Ok(_) => log::debug!("usrmerge: {} kept over {}", to.display(), from.display()),
        }
    }
    std::fs::remove_dir_all(src).map_err(RootError::io(src))
}

/// Merges `/bin`, `/sbin`, `/lib` and `/lib64` into `/usr` and leaves relative symlinks in
/// their place (`bin -> usr/bin`).
pub fn merge_usr(root: &Path) -> Result<(), RootError> {
    for d in MERGED_DIRS {
        let top = root.join(d);
        let under = root.join("usr").join(d);
        match std::fs::symlink_metadata(&top) {
            Ok(m) if m.file_type().is_symlink() => continue,
            Ok(m) if m.is_dir() => merge_into(&top, &under)?,
            Ok(_) => {
                return Err(RootError::Tree(format!(
                    "/{d} is neither a directory nor a symlink"
                )))
            }
            Err(_) => std::fs::create_dir_all(&under).map_err(RootError::io(&under))?,
        }
        std::os::unix::fs::symlink(format!("usr/{d}"), &top).map_err(RootError::io(&top))?;
    }
    Ok(())
}

/// Removes [`PRUNED`].
pub fn prune(root: &Path) -> Result<(), RootError> {
    for p in PRUNED {
        let path = root.join(p);
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(RootError::io(&path))?;
        }
    }
    Ok(())
}

/// The mount points, `/etc/passwd` and `/etc/group` with root and nobody (what base-passwd
/// would install), and `/etc/hostname`-free defaults; existing account files are kept.
pub fn skeleton(root: &Path) -> Result<(), RootError> {
    use std::os::unix::fs::PermissionsExt;
    for (d, mode) in MOUNT_POINTS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(RootError::io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(RootError::io(&p))?;
    }
    let files: [(&str, &str); 2] = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ];
    for (name, text) in files {
        let p = root.join(name);
        if !p.exists() {
            std::fs::write(&p, text).map_err(RootError::io(&p))?;
        }
    }
    Ok(())
}

/// Bytes and inodes the tree needs (apparent sizes rounded up to 4 KiB blocks; a file
/// with several hard links, as Mesa's drivers are, counted once).
pub fn usage(root: &Path) -> Result<(u64, u64), RootError> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut linked = std::collections::HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(RootError::io(&dir))? {
            let entry = entry.map_err(RootError::io(&dir))?;
            let meta = std::fs::symlink_metadata(entry.path()).map_err(RootError::io(&dir))?;
            if !meta.is_dir() && meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
                continue;
            }
            inodes += 1;
            bytes += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                bytes += 4096;
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn usr_is_merged_whatever_layout_the_packages_used() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        // Debian 12 style: files under /bin and /lib, others under /usr.
        write(r, "bin/dash", "dash");
        symlink("dash", r.join("bin/sh")).unwrap();
        write(r, "lib/x86_64-linux-gnu/libc.so.6", "libc");
        write(r, "lib64/ld-linux-x86-64.so.2", "ld");
        write(r, "usr/lib/x86_64-linux-gnu/libz.so.1", "z");
        write(r, "usr/bin/weston", "weston");
        // A compat symlink in /usr pointing at the real file in /lib.
        symlink(
            "/lib/x86_64-linux-gnu/libc.so.6",
            r.join("usr/lib/x86_64-linux-gnu/libc.so.6"),
        )
        .unwrap();
        merge_usr(r).unwrap();
        for d in MERGED_DIRS {
            let link = std::fs::read_link(r.join(d)).unwrap();
            assert_eq!(link, PathBuf::from(format!("usr/{d}")));
        }
        let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        assert_eq!(read("bin/sh"), "dash");
        assert_eq!(read("usr/bin/weston"), "weston");
        assert_eq!(read("lib64/ld-linux-x86-64.so.2"), "ld");
        assert_eq!(read("lib/x86_64-linux-gnu/libz.so.1"), "z");
        // The real file replaced the compat link.
        let libc = r.join("usr/lib/x86_64-linux-gnu/libc.so.6");
        assert!(std::fs::symlink_metadata(&libc).unwrap().is_file());
        assert_eq!(read("usr/lib/x86_64-linux-gnu/libc.so.6"), "libc");
        // Running it again changes nothing.
        merge_usr(r).unwrap();
        assert_eq!(read("bin/sh"), "dash");
    }

    #[test]
    fn the_skeleton_has_the_mount_points_and_accounts() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "usr/share/doc/x/copyright", "c");
        write(r, "usr/share/weston/pattern.png", "p");
        prune(r).unwrap();
        skeleton(r).unwrap();
        assert!(!r.join("usr/share/doc").exists());
        assert!(r.join("usr/share/weston/pattern.png").exists());
        for (d, _) in MOUNT_POINTS {
            assert!(r.join(d).is_dir(), "{d}");
        }
        let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:"));
        let (bytes, inodes) = usage(r).unwrap();
        assert!(
            bytes >= 4096 * 2 && inodes >= MOUNT_POINTS.len() as u64,
            "{bytes} {inodes}"
        );
    }
}
