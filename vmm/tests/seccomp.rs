//! The VMM's seccomp filters, for real: each kind's list installed in a forked child, the
//! calls a taken-over VMM would try first kill it with SIGSYS; and the real binary's
//! test-only escape mode (`--test-escape`, from a vCPU-filtered thread) killed the same way.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use bulkhead_vmm::seccomp::{allow_list, SeccompMode, ALL_KINDS};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// The calls a taken-over VMM would try first.
const FORBIDDEN: [&str; 10] = [
    "openat",
    "socket(AF_INET)",
    "ptrace",
    "mount",
    "fcntl(F_OFD_SETLK)",
    "fcntl(F_SETLKW)",
    "kill",
    "execve",
    "unshare",
    "fork (clone without CLONE_THREAD)",
];

/// Makes attempt `i` (an index into FORBIDDEN), or with `usize::MAX` what every thread
/// does all the time (returns 1 when it worked).
fn attempt(i: usize) -> i32 {
    let unlock = libc::flock {
        l_type: libc::F_UNLCK as i16,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: raw system calls on NUL-terminated literals and live locals, in a child
    // process that ends right after.
    unsafe {
        match i {
            0 => libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY),
            1 => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0),
            2 => libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) as i32,
            3 => libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ),
            4 => libc::fcntl(0, libc::F_OFD_SETLK, &unlock),
            5 => libc::fcntl(0, libc::F_SETLKW, &unlock),
            6 => libc::kill(1, 0),
            7 => libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null()),
            8 => libc::unshare(libc::CLONE_NEWUSER),
            9 => libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) as i32,
            _ => {
                (libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) == 0
                    && libc::fcntl(0, libc::F_GETFD) >= -1
                    && libc::getpid() > 0) as i32
            }
        }
    }
}

/// Runs attempt `i` in a child that installed `kind`'s filter (kill mode) first.
fn in_filtered_child(kind: bulkhead_vmm::seccomp::ThreadKind, i: usize) -> WaitStatus {
    let progs = allow_list(kind).compile_all(SeccompMode::Kill).unwrap();
    // SAFETY: the child installs the filter, makes raw system calls and _exits.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let code = if progs.iter().all(|p| seccompiler::apply_filter(p).is_ok()) {
                attempt(i)
            } else {
                99
            };
            // SAFETY: _exit ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).unwrap(),
    }
}

fn sigsys(s: WaitStatus) -> bool {
    matches!(s, WaitStatus::Signaled(_, Signal::SIGSYS, _))
}

#[test]
fn every_kind_kills_the_escape_calls_and_allows_its_own() {
    for kind in ALL_KINDS {
        for (i, what) in FORBIDDEN.iter().enumerate() {
            let s = in_filtered_child(kind, i);
            assert!(sigsys(s), "{kind:?}: {what} not killed: {s:?}");
        }
        let s = in_filtered_child(kind, usize::MAX);
        assert!(matches!(s, WaitStatus::Exited(_, 1)), "{kind:?}: {s:?}");
    }
}

/// What virtio_wl's VFD_NEW does without a hub (`commands::memfd`), as raw calls: a
/// sealable memfd made mode 0644, sized and sealed. Returns 1 when all of it worked.
fn guest_memfd() -> i32 {
    // SAFETY: raw system calls on a literal name and the fd they return, in a child that
    // ends right after.
    unsafe {
        let fd = libc::memfd_create(
            c"bulkhead-wl".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        (fd >= 0
            && libc::fchmod(fd, 0o644) == 0
            && libc::ftruncate(fd, 8192) == 0
            && libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
            ) == 0) as i32
    }
}

/// A worker started by a vCPU (virtio_wl's, on the guest's DRIVER_OK) carries both
/// filters; under them it makes the guest's shared memory (before, `fchmod` was on
/// neither list and the first VFD_NEW killed the VMM with SIGSYS).
#[test]
fn a_worker_started_by_a_vcpu_can_make_guest_shared_memory() {
    use bulkhead_vmm::seccomp::ThreadKind;
    let vcpu = allow_list(ThreadKind::Vcpu)
        .compile_all(SeccompMode::Kill)
        .unwrap();
    let worker = allow_list(ThreadKind::Worker)
        .compile_all(SeccompMode::Kill)
        .unwrap();
    // SAFETY: the child installs the filters, makes raw system calls and _exits.
    let s = match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let installed = vcpu
                .iter()
                .chain(worker.iter())
                .all(|p| seccompiler::apply_filter(p).is_ok());
            let code = if installed { guest_memfd() } else { 99 };
            // SAFETY: _exit ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).unwrap(),
    };
    assert!(matches!(s, WaitStatus::Exited(_, 1)), "{s:?}");
}

/// The real binary: every escape attempt but memory (tested in a cgroup under QEMU) ends
/// the process by SIGSYS.
#[test]
fn the_real_vmm_is_killed_by_seccomp_for_each_escape_attempt_from_a_vcpu_thread() {
    for attempt in [
        "open-host-file",
        "socket-inet",
        "ptrace",
        "mount",
        "ofd-unlock",
        "fork",
        "kill",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
            .args(["--kernel", "/dev/null", "--test-escape", attempt])
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{attempt}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // In log mode the same call is let through (and logged by the kernel): the attempt then
    // fails or succeeds on its own, the process is not killed.
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args([
            "--kernel",
            "/dev/null",
            "--seccomp",
            "log",
            "--test-escape",
            "ofd-unlock",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), None, "{:?}", out.status);
}

/// A device worker is started by a vCPU (the guest's DRIVER_OK) and carries the vCPU's
/// filter and its own: starting it, and what a worker does first (an eventfd, epoll,
/// a memfd), must pass both.
#[test]
fn a_vcpu_thread_can_start_a_worker_thread() {
    // SAFETY: the child runs filtered threads and _exits with their verdict.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let code = std::thread::spawn(|| {
                if bulkhead_vmm::seccomp::allow_list(bulkhead_vmm::seccomp::ThreadKind::Vcpu)
                    .install(SeccompMode::Kill)
                    .is_err()
                {
                    return 98;
                }
                let worker = std::thread::Builder::new().name("worker".into()).spawn(|| {
                    if bulkhead_vmm::seccomp::allow_list(bulkhead_vmm::seccomp::ThreadKind::Worker)
                        .install(SeccompMode::Kill)
                        .is_err()
                    {
                        return 97;
                    }
                    let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK);
                    let p = vmm_sys_util::epoll::Epoll::new();
                    (e.is_ok() && p.is_ok()) as i32
                });
                match worker {
                    Ok(t) => t.join().unwrap_or(96),
                    Err(_) => 95,
                }
            })
            .join()
            .unwrap_or(94);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let s = waitpid(child, None).unwrap();
            assert!(matches!(s, WaitStatus::Exited(_, 1)), "{s:?}");
        }
    }
}

/// Set in the fresh process [`a_worker_that_frees_its_heap_at_teardown_is_not_killed`]
/// starts: `shipped` (the lists as they are) or `no-openat-rule` (the control: the lists
/// without their `openat` rule).
const HEAP_TRIM_CHILD: &str = "BULKHEAD_TEST_HEAP_TRIM_CHILD";

/// In the fresh process: this (test) thread plays a vCPU, installs the vCPU filter and
/// starts a device worker that installs its own on top, as virtio_wl's worker does; the
/// worker then holds 1.6 MiB of heap in pieces glibc serves from the worker's own arena
/// (below the mmap threshold) and frees it all, as a worker clearing its state when the
/// VM is torn down does.
fn heap_trim_child(shipped: bool) {
    use bulkhead_vmm::seccomp::ThreadKind;
    let list = |kind| {
        let mut l = allow_list(kind);
        if !shipped {
            l.without(libc::SYS_openat);
        }
        l
    };
    list(ThreadKind::Vcpu).install(SeccompMode::Kill).unwrap();
    let worker = list(ThreadKind::Worker);
    std::thread::Builder::new()
        .name("virtio-wl".into())
        .spawn(move || {
            worker.install(SeccompMode::Kill).unwrap();
            let held: Vec<Vec<u8>> = (0..16u8).map(|i| vec![i; 100 << 10]).collect();
            std::hint::black_box(&held);
            for v in held.into_iter().rev() {
                drop(std::hint::black_box(v));
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

/// The defect of gui-vm's VMM being killed by SIGSYS as the VM was torn down after the
/// guest's power-off: glibc's malloc, the first time it gives part of a thread's heap back
/// (a worker dropping a lot at once), reads `/proc/sys/vm/overcommit_memory` with
/// `openat`, which no VMM list allowed. In a fresh process (glibc fixes the number of
/// arenas at the first thread's first allocation, so a forked test child may share one):
/// with the lists as shipped the worker frees its heap and the process ends normally;
/// the control, the same lists without their `openat` rule, is killed by SIGSYS (so the
/// allocation pattern does reach glibc's heap trim here).
#[test]
fn a_worker_that_frees_its_heap_at_teardown_is_not_killed() {
    if let Ok(which) = std::env::var(HEAP_TRIM_CHILD) {
        heap_trim_child(which == "shipped");
        return;
    }
    let run = |which: &str| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "a_worker_that_frees_its_heap_at_teardown_is_not_killed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HEAP_TRIM_CHILD, which)
            .output()
            .unwrap()
    };
    let out = run("shipped");
    assert!(
        out.status.success(),
        "the worker was killed freeing its heap: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    let control = run("no-openat-rule");
    assert_eq!(
        control.status.signal(),
        Some(libc::SIGSYS),
        "without the rule the same frees should reach glibc's openat and be killed: {:?}",
        control.status
    );
}
