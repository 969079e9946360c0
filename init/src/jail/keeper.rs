//! The PID namespace of a jail, and its keeper.
//!
//! A jailed process gets a PID namespace of its own, as Firecracker's jailer
//! (`--new-pid-ns`) and minijail (`-p`) give one: it is PID 1 there and sees no other
//! process (not init, not another VMM, not the hub), so it can name none to signal or
//! trace. `unshare(CLONE_NEWPID)` only moves the caller's *children*, so the child init
//! forked ([`super::Prepared::enter`]) forks once more: the new process is PID 1 of the
//! namespace and goes on to exec the service; the child itself stays outside as its
//! *keeper* ([`run`]), the process init started, supervises and reaps:
//!
//! * **exit status**: the keeper waits for the service and ends the same way: the same
//!   exit code, or killed by the same signal (SIGSYS from a seccomp filter, SIGKILL from the
//!   OOM killer…), so init's reports by VM name and its restart decisions are unchanged;
//! * **stop signals**: init signals a service's process group (`killpg`), which holds both
//!   (the keeper made the session before the fork). The kernel drops a signal sent to a
//!   namespace's PID 1 from outside when that process leaves it at its default action
//!   (only SIGKILL and SIGSTOP are forced), where any other process would have died of
//!   it. A VMM blocks SIGTERM and takes it with sigwait (its guest's power button), so it
//!   gets it; for a service that leaves SIGTERM, SIGINT or SIGHUP at the default action
//!   (the hub), the keeper, which also gets the signal, sends SIGKILL instead (the same end:
//!   a default-action SIGTERM runs no handler either) and then ends by the signal init sent;
//! * **lifetime**: the service gets SIGKILL when its keeper dies (`PR_SET_PDEATHSIG`); both
//!   are in the jail's cgroup, which init empties before a restart.
//!
//! The keeper keeps no descriptor (so std's exec-error pipe reports the service's exec),
//! stays in init's other namespaces (it reads the service's signal dispositions in
//! `/proc`), and runs as root like the init it was forked from; the service, in its own
//! PID namespace under another uid, cannot name it, signal it or trace it.

use std::io::Error;

/// The signals a stop may send, for which the keeper makes up for the namespace's rule.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// In the service, once its credentials are final (a uid change clears the setting): it
/// gets SIGKILL when its keeper dies.
pub fn die_with_keeper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// Exit status of a keeper that lost its service without a status (cannot happen: the
/// service is its only child).
const LOST: libc::c_int = 125;

/// In the forked child: moves the rest of the jail into a new PID namespace. Returns in the
/// service (PID 1 there); the keeper never returns.
pub fn enter() -> std::io::Result<()> {
    // SAFETY: unshare has no memory arguments.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: the child of single-threaded init forks again; both sides only make system
    // calls (the keeper) or go on with the jail's steps (the service).
    match unsafe { libc::fork() } {
        -1 => Err(Error::last_os_error()),
        0 => Ok(()),
        service => run(service),
    }
}

/// The keeper: waits for `service`, makes up for the namespace's rule on stop signals, and
/// ends the way the service ended.
pub fn run(service: libc::pid_t) -> ! {
    // SAFETY: close_range, sigprocmask, waitpid, sigwaitinfo and kill take integers or
    // live locals; nothing here allocates.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut stopped_by: Option<libc::c_int> = None;
        loop {
            let mut status = 0;
            let r = libc::waitpid(service, &mut status, libc::WNOHANG);
            if r == service {
                end_like(status, stopped_by);
            }
            if r < 0 && Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(LOST);
            }
            let sig = libc::sigwaitinfo(&set, std::ptr::null_mut());
            if STOP_SIGNALS.contains(&sig) && takes_default_action(service, sig) {
                libc::kill(service, libc::SIGKILL);
                stopped_by.get_or_insert(sig);
            }
        }
    }
}

/// Ends this process as `status` says the service ended: its exit code, or its signal
/// (the stop signal that the keeper turned into SIGKILL, if it did).
fn end_like(status: libc::c_int, stopped_by: Option<libc::c_int>) -> ! {
    // SAFETY: signal, sigprocmask, kill and _exit take integers or live locals.
    unsafe {
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let mut sig = libc::WTERMSIG(status);
            if sig == libc::SIGKILL {
                sig = stopped_by.unwrap_or(sig);
            }
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            // A signal whose default is to be ignored: say which as shells do.
            libc::_exit(128 + sig);
        }
        libc::_exit(LOST)
    }
}

/// Whether `sig` is at its default action in process `pid`: neither blocked (by its main
/// thread), ignored nor caught, per `/proc/<pid>/status`. False when that cannot be read.
fn takes_default_action(pid: libc::pid_t, sig: libc::c_int) -> bool {
    let mut path = [0u8; 32];
    let mut n = 0;
    for b in b"/proc/".iter().copied().chain(Digits::of(pid)) {
        if let Some(p) = path.get_mut(n) {
            *p = b;
            n += 1;
        }
    }
    for b in b"/status\0" {
        if let Some(p) = path.get_mut(n) {
            *p = *b;
            n += 1;
        }
    }
    let mut buf = [0u8; 8192];
    // SAFETY: open/read/close on a NUL-terminated local path and a local buffer.
    let len = unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let len = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        len
    };
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    let text = buf.get(..len).unwrap_or(&[]);
    at_default(text, sig)
}

/// From the text of a `/proc/<pid>/status`: is `sig` neither blocked, ignored nor caught?
pub fn at_default(status: &[u8], sig: libc::c_int) -> bool {
    let Some(bit) = u32::try_from(sig - 1).ok().filter(|b| *b < 64) else {
        return false;
    };
    let mut found = 0;
    for line in status.split(|b| *b == b'\n') {
        for field in [b"SigBlk:".as_slice(), b"SigIgn:", b"SigCgt:"] {
            if let Some(rest) = line.strip_prefix(field) {
                let Some(mask) = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|t| u64::from_str_radix(t.trim(), 16).ok())
                else {
                    return false;
                };
                if mask & (1 << bit) != 0 {
                    return false;
                }
                found += 1;
            }
        }
    }
    found == 3
}

/// The decimal digits of a non-negative pid, without allocating.
struct Digits {
    buf: [u8; 10],
    start: usize,
}

impl Digits {
    fn of(pid: libc::pid_t) -> Self {
        let mut buf = [b'0'; 10];
        let mut v = pid.unsigned_abs();
        let mut start = buf.len();
        loop {
            start -= 1;
            if let Some(d) = buf.get_mut(start) {
                *d = b'0' + (v % 10) as u8;
            }
            v /= 10;
            if v == 0 || start == 0 {
                break;
            }
        }
        Self { buf, start }
    }
}

impl Iterator for Digits {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        let b = self.buf.get(self.start).copied();
        if b.is_some() {
            self.start += 1;
        }
        b
    }
}

/// The service a keeper started: its one child, from
/// `/proc/<keeper>/task/<keeper>/children`. `None` if it has none (yet, or any more).
pub fn service_of(keeper: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_of_pids() {
        assert_eq!(Digits::of(0).collect::<Vec<_>>(), b"0");
        assert_eq!(Digits::of(4194304).collect::<Vec<_>>(), b"4194304");
    }

    /// A VMM blocks SIGTERM (bit 14): not at default; the hub catches nothing: at default;
    /// an unreadable status is never taken for default.
    #[test]
    fn default_action_from_status() {
        let vmm = b"Name:\tbulkhead-vmm\nSigBlk:\t0000000000004002\nSigIgn:\t0000000000001000\nSigCgt:\t0000000100000000\n";
        let hub = b"Name:\tbulkhead-hub\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\nSigCgt:\t0000000000000000\n";
        assert!(!at_default(vmm, libc::SIGTERM));
        assert!(!at_default(vmm, libc::SIGINT));
        assert!(at_default(vmm, libc::SIGHUP));
        assert!(at_default(hub, libc::SIGTERM));
        assert!(!at_default(hub, libc::SIGPIPE));
        assert!(!at_default(b"Name:\tx\n", libc::SIGTERM));
        assert!(!at_default(
            b"SigBlk:\tzz\nSigIgn:\t0\nSigCgt:\t0\n",
            libc::SIGTERM
        ));
    }
}
