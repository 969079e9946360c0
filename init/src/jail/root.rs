//! The jail's root: an empty tmpfs holding only the program and the named paths (bound
//! read-only, the hub's runtime directory read-write, the hub's own procfs), made the root
//! with `pivot_root` (or moved over `/` and chrooted into from an initramfs), then
//! read-only. Runs in the child, on the plan [`super::JailSpec::prepare`] made.

use super::{check, step, Prepared};

impl Prepared {
    pub(super) fn mount_root(&self) -> std::io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: every mount/mkdir/open/chdir below gets NUL-terminated strings that live in
        // `self` (or are literals) for the whole call; the null pointers are the documented
        // "none" arguments.
        unsafe {
            step(
                "make / private",
                check(libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )),
            )?;
            step(
                "mount the tmpfs root",
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    self.staging.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=0755,size=256k,nr_inodes=4096".as_ptr().cast(),
                )),
            )?;
            for d in &self.dirs {
                step("mkdir", check(libc::mkdir(d.as_ptr(), 0o755)))?;
            }
            for f in &self.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o444,
                );
                step("create a file", check(fd))?;
                libc::close(fd);
            }
            for b in &self.binds {
                step(
                    "bind",
                    check(libc::mount(
                        b.src_proc.as_ptr(),
                        b.target.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    )),
                )?;
                step(
                    "remount a bind",
                    check(libc::mount(
                        none,
                        b.target.as_ptr(),
                        none,
                        b.flags,
                        std::ptr::null(),
                    )),
                )?;
            }
            if let Some(target) = &self.proc_target {
                // A procfs of the PID namespace this process is PID 1 of: it shows only
                // itself.
                step(
                    "mount its own /proc",
                    check(libc::mount(
                        c"proc".as_ptr(),
                        target.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                        std::ptr::null(),
                    )),
                )?;
            }
            step(
                "chdir to the new root",
                check(libc::chdir(self.staging.as_ptr())),
            )?;
            let pivoted = libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0;
            if pivoted {
                step(
                    "detach the old root",
                    check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH)),
                )?;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // Init runs from the initramfs (rootfs), which cannot be pivoted away: move
                // the new root over / and chroot into it, as switch_root does. The old root
                // stays below, covered, reachable by no path (and chroot, the way out of a
                // chroot, needs a capability the jail drops).
                step(
                    "move the new root over /",
                    check(libc::mount(
                        c".".as_ptr(),
                        c"/".as_ptr(),
                        none,
                        libc::MS_MOVE,
                        std::ptr::null(),
                    )),
                )?;
                step("chroot", check(libc::chroot(c".".as_ptr())))?;
            } else {
                step("pivot_root", check(-1))?;
            }
            step("chdir /", check(libc::chdir(c"/".as_ptr())))?;
            step(
                "remount / read-only",
                check(libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    std::ptr::null(),
                )),
            )?;
        }
        Ok(())
    }
}
