//! What the VMM's and the hub's seccomp filters are made of: an allow-list (a table from
//! system call to the argument conditions under which it is allowed), compiled with
//! seccompiler into a BPF program whose every other call kills the process
//! (`SECCOMP_RET_KILL_PROCESS`), or only logs it in `--seccomp log` mode (development: the
//! kernel logs `type=1326 … syscall=N` and the call goes on).
//!
//! The lists themselves are where the processes are: `vmm/src/seccomp.rs` (one per thread
//! kind) and `ipc/src/hub/seccomp.rs`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a filter does with a call that is not on its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the whole process (the default).
    Kill,
    /// Let the call through and have the kernel log it (development).
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("--seccomp {s}: kill or log")),
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules or could not install the program.
    #[error("seccomp: {0}")]
    Filter(String),
}

/// An allow-list: system call number → the rules (any of them) under which it is allowed;
/// an empty list allows it whatever its arguments. A few calls may instead be answered
/// `ENOENT` without running ([`AllowList::enoent_if32`]): what the C library tries on its
/// own and copes with when it fails.
#[derive(Debug, Default, Clone)]
pub struct AllowList {
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    enoent: BTreeMap<i64, Vec<SeccompRule>>,
}

/// One argument condition: (argument index, operator, value), compared as 64 bits unless
/// `Dword` is asked for by [`AllowList::allow_if32`].
pub type Cond = (u8, SeccompCmpOp, u64);

impl AllowList {
    /// An empty list (everything killed).
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows each call whatever its arguments (an `ENOENT` answer for it is dropped).
    pub fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for c in calls {
            self.rules.insert(*c, Vec::new());
            self.enoent.remove(c);
        }
        self
    }

    fn rule(len: SeccompCmpArgLen, conds: &[Cond]) -> Option<SeccompRule> {
        let conditions: Vec<SeccompCondition> = conds
            .iter()
            .filter_map(|(arg, op, v)| {
                SeccompCondition::new(*arg, len.clone(), op.clone(), *v).ok()
            })
            .collect();
        if conditions.len() != conds.len() {
            return None; // a malformed condition allows nothing
        }
        SeccompRule::new(conditions).ok()
    }

    fn add_rule(&mut self, call: libc::c_long, len: SeccompCmpArgLen, conds: &[Cond]) {
        let Some(rule) = Self::rule(len, conds) else {
            return;
        };
        // An unconditional allow stays unconditional.
        if !self.unconditional(call) {
            self.rules.entry(call).or_default().push(rule);
        }
    }

    fn unconditional(&self, call: libc::c_long) -> bool {
        self.rules.get(&call).is_some_and(|r| r.is_empty())
    }

    /// Allows `call` when every condition holds (64-bit compares). Several calls of this
    /// for one system call allow it when any of them holds.
    pub fn allow_if(&mut self, call: libc::c_long, conds: &[Cond]) -> &mut Self {
        self.add_rule(call, SeccompCmpArgLen::Qword, conds);
        self
    }

    /// As [`AllowList::allow_if`], comparing the low 32 bits (`int` arguments).
    pub fn allow_if32(&mut self, call: libc::c_long, conds: &[Cond]) -> &mut Self {
        self.add_rule(call, SeccompCmpArgLen::Dword, conds);
        self
    }

    /// Answers `call` with `ENOENT`, without running it, when every condition holds
    /// (32-bit compares); other arguments stay as the list says (killed if it is not on
    /// it). Never for a call the list allows whatever its arguments. For what the C
    /// library tries by itself and does without when it fails (see
    /// [`glibc_heap_trim_probe`]): no file is ever opened that way.
    pub fn enoent_if32(&mut self, call: libc::c_long, conds: &[Cond]) -> &mut Self {
        if conds.is_empty() || self.unconditional(call) {
            return self;
        }
        if let Some(rule) = Self::rule(SeccompCmpArgLen::Dword, conds) {
            self.enoent.entry(call).or_default().push(rule);
        }
        self
    }

    /// Takes `call` off the list entirely (allowed or answered `ENOENT`): for tests that
    /// show what a rule is for.
    pub fn without(&mut self, call: libc::c_long) -> &mut Self {
        self.rules.remove(&call);
        self.enoent.remove(&call);
        self
    }

    /// Is `call` on the list (under some condition)?
    pub fn contains(&self, call: libc::c_long) -> bool {
        self.rules.contains_key(&call)
    }

    /// Is `call` answered `ENOENT` under some condition?
    pub fn answers_enoent(&self, call: libc::c_long) -> bool {
        self.enoent.contains_key(&call)
    }

    /// The list's calls, for documentation and tests.
    pub fn calls(&self) -> Vec<libc::c_long> {
        self.rules.keys().copied().collect()
    }

    fn program(
        rules: BTreeMap<i64, Vec<SeccompRule>>,
        mismatch: SeccompAction,
        matched: SeccompAction,
    ) -> Result<BpfProgram, SeccompError> {
        let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .map_err(|e| SeccompError::Filter(e.to_string()))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SeccompError::Filter(e.to_string()))
    }

    /// Compiles the filters, in the order [`AllowList::install`] installs them: first (if
    /// the list answers any call `ENOENT`) one that answers those and lets everything else
    /// through, then the allow-list itself, where allowed calls (and the `ENOENT` ones,
    /// which the first filter answers: the kernel takes the strictest verdict of a
    /// thread's filters) pass and everything else kills the process (or is logged, in
    /// `Log` mode).
    pub fn compile_all(&self, mode: SeccompMode) -> Result<Vec<BpfProgram>, SeccompError> {
        let mismatch = match mode {
            SeccompMode::Kill => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        };
        let mut rules = self.rules.clone();
        for (call, r) in &self.enoent {
            rules.entry(*call).or_default().extend(r.iter().cloned());
        }
        let mut progs = Vec::new();
        if !self.enoent.is_empty() {
            progs.push(Self::program(
                self.enoent.clone(),
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOENT as u32),
            )?);
        }
        progs.push(Self::program(rules, mismatch, SeccompAction::Allow)?);
        Ok(progs)
    }

    /// Compiles and installs the filters on the calling thread (threads it starts later
    /// inherit them; filters stack, so a thread's allowed calls are those of every filter
    /// it carries). Sets no_new_privs.
    pub fn install(&self, mode: SeccompMode) -> Result<(), SeccompError> {
        for prog in self.compile_all(mode)? {
            seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Filter(e.to_string()))?;
        }
        Ok(())
    }

    /// `fcntl` for every command but the record locks (`F_SETLK`, `F_SETLKW`,
    /// `F_OFD_SETLK`, `F_OFD_SETLKW`): the hub's memfd liveness probe and tombstones hold
    /// OFD locks that a VMM must never be able to release (seccomp sees the command, not
    /// the lock type, so setting any lock is refused).
    pub fn fcntl_without_locks(&mut self) -> &mut Self {
        let ne = |cmd: libc::c_int| (1u8, SeccompCmpOp::Ne, cmd as u64);
        self.allow_if32(
            libc::SYS_fcntl,
            &[
                ne(libc::F_SETLK),
                ne(libc::F_SETLKW),
                ne(libc::F_OFD_SETLK),
                ne(libc::F_OFD_SETLKW),
            ],
        )
    }

    /// `ioctl` for every request but the terminal ones that inject input into or steal a
    /// console (`TIOCSTI`, `TIOCLINUX`).
    pub fn ioctl_without_tty_injection(&mut self) -> &mut Self {
        let ne = |req: libc::c_ulong| (1u8, SeccompCmpOp::Ne, req);
        self.allow_if32(
            libc::SYS_ioctl,
            &[ne(libc::TIOCSTI), ne(libc::TIOCLINUX as libc::c_ulong)],
        )
    }

    /// `socket` and `socketpair` for `AF_UNIX` only.
    pub fn unix_sockets_only(&mut self) -> &mut Self {
        let unix = [(0u8, SeccompCmpOp::Eq, libc::AF_UNIX as u64)];
        self.allow_if32(libc::SYS_socket, &unix)
            .allow_if32(libc::SYS_socketpair, &unix)
    }

    /// `tgkill` and `tkill` to this process's own threads only (kicking a vCPU).
    pub fn signals_to_self_only(&mut self) -> &mut Self {
        let pid = std::process::id() as u64;
        self.allow_if32(libc::SYS_tgkill, &[(0, SeccompCmpOp::Eq, pid)])
    }
}

/// What every thread of every Bulkhead process may do: memory, time, futexes, reading and
/// writing descriptors it already has, polling them, and ending.
pub fn base() -> AllowList {
    let mut l = AllowList::new();
    l.allow(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_dup,
        libc::SYS_futex,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd2,
    ]);
    l.fcntl_without_locks().ioctl_without_tty_injection();
    l
}

/// What starting a thread needs (pthread_create and Rust's thread start): `clone` with the
/// thread flags only (never a fork), `clone3` (whose flags seccomp cannot see: a process
/// made that way still carries every filter and its cgroup's pids.max), and the new
/// thread's own setup.
pub fn thread_creation(l: &mut AllowList) -> &mut AllowList {
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
    l.allow_if(
        libc::SYS_clone,
        &[(0, SeccompCmpOp::MaskedEq(thread), thread)],
    )
    .allow(&[libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq])
    .allow_if32(
        libc::SYS_prctl,
        &[(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)],
    )
    // The new thread installs its own filter on top (which only narrows what it may do).
    .allow_if32(
        libc::SYS_prctl,
        &[(0, SeccompCmpOp::Eq, libc::PR_SET_NO_NEW_PRIVS as u64)],
    )
    .allow_if32(
        libc::SYS_seccomp,
        &[(0, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER as u64)],
    )
}

/// What glibc's malloc does the first time it gives part of a thread's heap back to the
/// kernel (a `free` in an arena other than the main thread's that leaves more than the trim
/// threshold free at the heap's top, which happens to a VMM's threads when they drop a
/// lot at once, as when a VM is torn down): it reads whether memory overcommit is strict,
/// `openat(AT_FDCWD, "/proc/sys/vm/overcommit_memory", O_RDONLY|O_CLOEXEC)`
/// (`check_may_shrink_heap`), and if that fails it trims with `madvise(MADV_DONTNEED)`
/// and never asks again. Without this rule that call killed the process. It is answered
/// `ENOENT` (never run, so nothing is opened); any other `openat` still kills (a plain
/// `open(path, O_RDONLY)`, for one, passes no `O_CLOEXEC`).
pub fn glibc_heap_trim_probe(l: &mut AllowList) -> &mut AllowList {
    l.enoent_if32(
        libc::SYS_openat,
        &[(
            2,
            SeccompCmpOp::Eq,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        )],
    )
}

/// Unix-socket traffic on descriptors and paths (connect to a path, accept, send and
/// receive with descriptors attached).
pub fn unix_traffic(l: &mut AllowList) -> &mut AllowList {
    l.unix_sockets_only().allow(&[
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
    ])
}

/// Runs `attempt` in a forked child after installing `list` in `Kill` mode and returns how
/// the child ended: for tests that a filter kills (SIGSYS) or lets a call through. The
/// child does nothing but the install, the attempt and `_exit`.
#[cfg(test)]
pub(crate) fn run_filtered(list: &AllowList, attempt: fn() -> i32) -> nix::sys::wait::WaitStatus {
    let progs = list.compile_all(SeccompMode::Kill).unwrap_or_default();
    // SAFETY: the child only calls async-signal-safe functions (prctl/seccomp through
    // apply_filter, the attempt's raw system calls) and _exit.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let installed =
                !progs.is_empty() && progs.iter().all(|p| seccompiler::apply_filter(p).is_ok());
            let code = if installed { attempt() } else { 99 };
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            nix::sys::wait::waitpid(child, None).unwrap_or(nix::sys::wait::WaitStatus::StillAlive)
        }
        Err(_) => nix::sys::wait::WaitStatus::StillAlive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;

    fn killed(s: WaitStatus) -> bool {
        matches!(s, WaitStatus::Signaled(_, Signal::SIGSYS, _))
    }

    /// The base list, installed for real in a child: what it allows passes, a lock command
    /// of fcntl and an AF_INET socket kill the process with SIGSYS.
    #[test]
    fn base_list_kills_locks_and_inet_sockets_and_allows_the_rest() {
        let mut l = base();
        unix_traffic(&mut l);
        assert!(matches!(
            run_filtered(&l, || {
                // SAFETY: getpid and an F_GETFD on stdin only read.
                unsafe { (libc::getpid() > 0 && libc::fcntl(0, libc::F_GETFD) >= -1) as i32 }
            }),
            WaitStatus::Exited(_, 1)
        ));
        assert!(killed(run_filtered(&l, || {
            let lock = libc::flock {
                l_type: libc::F_UNLCK as i16,
                l_whence: 0,
                l_start: 0,
                l_len: 0,
                l_pid: 0,
            };
            // SAFETY: fcntl reads a live flock.
            unsafe { libc::fcntl(0, libc::F_OFD_SETLK, &lock) }
        })));
        assert!(killed(run_filtered(&l, || {
            // SAFETY: socket takes integers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
        })));
        assert!(matches!(
            run_filtered(&l, || {
                // SAFETY: socket takes integers.
                let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                (fd >= 0) as i32
            }),
            WaitStatus::Exited(_, 1)
        ));
    }

    /// The glibc heap-trim probe is answered ENOENT (nothing opened, the process lives);
    /// an `openat` with other flags is still killed; a list that allows `openat` outright
    /// (the hub's) keeps it allowed.
    #[test]
    fn the_heap_trim_probe_is_answered_enoent_and_other_opens_killed() {
        fn probe() -> i32 {
            // SAFETY: openat on a NUL-terminated literal; the result is only compared.
            let fd = unsafe {
                libc::openat(
                    libc::AT_FDCWD,
                    c"/proc/sys/vm/overcommit_memory".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            };
            // 1: refused with ENOENT, as glibc copes with.
            (fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)) as i32
        }
        let mut l = base();
        glibc_heap_trim_probe(&mut l);
        assert!(matches!(run_filtered(&l, probe), WaitStatus::Exited(_, 1)));
        assert!(killed(run_filtered(&l, || {
            // SAFETY: open on a NUL-terminated literal.
            unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) }
        })));
        l.allow(&[libc::SYS_openat]);
        assert!(!l.answers_enoent(libc::SYS_openat));
        assert!(matches!(
            run_filtered(&l, || {
                // SAFETY: openat on a NUL-terminated literal.
                let fd = unsafe {
                    libc::openat(
                        libc::AT_FDCWD,
                        c"/proc/sys/vm/overcommit_memory".as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    )
                };
                (fd >= 0) as i32
            }),
            WaitStatus::Exited(_, 1)
        ));
    }

    #[test]
    fn modes_parse() {
        assert_eq!("kill".parse(), Ok(SeccompMode::Kill));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("off".parse::<SeccompMode>().is_err());
    }
}
