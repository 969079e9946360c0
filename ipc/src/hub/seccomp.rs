//! The hub's seccomp filter (one thread, one list), installed by `bulkhead-hub` once its
//! sockets are bound, its audit log open and its policy loaded, before it reads anything a
//! VM or a control client sent. Built from what the hub calls (strace of the ipc tests'
//! real hub, and review); update it the way `vmm/src/seccomp.rs` says.
//!
//! Unlike a VMM, the hub keeps `fcntl`'s lock commands (its memfd liveness probe and
//! tombstones are OFD locks it holds) and reads files (a policy apply re-reads the policy
//! directories). It never execs, forks, mounts, traces, or makes a non-Unix socket.

use crate::seccomp::{base, unix_traffic, AllowList};

/// The hub's allow-list.
pub fn allow_list() -> AllowList {
    let mut l = base();
    unix_traffic(&mut l);
    l.allow(&[
        // Every fcntl command, record locks included.
        libc::SYS_fcntl,
        // The memfd server.
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        // Policy reloads and the audit log.
        libc::SYS_openat,
        libc::SYS_getdents64,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_fchmod,
        libc::SYS_close_range,
        libc::SYS_pipe2,
        libc::SYS_kcmp,
        // Credentials of peers are compared with its own.
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
    ]);
    l
}
