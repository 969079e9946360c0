//! The VMM's seccomp filters, one per thread kind, all in this file (as Firecracker keeps
//! its filters in one place). A thread installs its kind's filter as the first thing it
//! does ([`apply`]), before it reads anything a guest or another VM sent. Every other call
//! kills the whole process (`--seccomp log`: the kernel logs it instead).
//!
//! Filters stack: a thread started by a filtered thread carries its parent's filter too,
//! and may only make the calls both allow. The threads and who starts them:
//!
//! | kind | threads | started by |
//! |---|---|---|
//! | [`ThreadKind::Main`] | `main`, after it has started the others (its filter last) | — |
//! | [`ThreadKind::Vcpu`] | `vcpu<N>` | main, before its own filter |
//! | [`ThreadKind::Worker`] | virtio queue workers, `virtio-wl`, `virtio-net`, `serial-in`, `serial-out` | a vCPU (the guest's DRIVER_OK write) or main |
//! | [`ThreadKind::Worker`] | `virtio-net-link` (connects to the net VM, maps the ring) | main, at start |
//! | [`ThreadKind::Control`] | `control` (the control socket), `stop-signals` | main |
//!
//! So the vCPU list holds everything a device worker needs as well (a worker's effective
//! list is vCPU ∩ worker).
//!
//! ## Keeping the lists true
//!
//! A call missing from a list kills the VMM with SIGSYS, which init reports as
//! `<service> killed by seccomp (SIGSYS): vm <name> …`. When code that makes a new system
//! call lands (a new device, virtio-net's tap, a new ioctl family):
//!
//! 1. run the e2e tests (or the VM) with `--seccomp log` in the service's `exec`; the
//!    emulated host's kernel logs `audit: type=1326 … comm="<thread>" … syscall=<nr>` for
//!    each call a filter does not allow (boot with `loglevel=7` to see them on the console);
//!    or strace the VMM on the build machine (`strace -f -o out bulkhead-vmm …` with a tiny
//!    guest, `tests/bzimage_boot.rs`);
//! 2. add the call to the kind of the thread that makes it (a thread started by a vCPU
//!    needs it on the vCPU list too), with argument conditions when only some arguments
//!    are needed (see `bulkhead_ipc::seccomp::AllowList`);
//! 3. never add: `execve`, `ptrace`, `mount`, `umount2`, `pivot_root`, `chroot`,
//!    `unshare`, `setns`, `kill`, `socket` for anything but `AF_UNIX`, `fcntl` lock
//!    commands, `open`/`openat` (a VMM gets descriptors), `bpf`, `perf_event_open`,
//!    `userfaultfd`, `io_uring_*`, `keyctl`, `process_vm_*`.
//!
//! One call is answered rather than allowed or killed: glibc's malloc, the first time it
//! gives part of a thread's heap back to the kernel, opens
//! `/proc/sys/vm/overcommit_memory` (`openat` with exactly `O_RDONLY|O_CLOEXEC`); every
//! list answers that `ENOENT` without running it
//! (`bulkhead_ipc::seccomp::glibc_heap_trim_probe`). It had killed gui-vm's VMM with
//! SIGSYS as the VM was torn down (a worker freeing its state at once); any other
//! `openat` is still killed.
//!
//! `tests/seccomp.rs` installs each list in a child and checks that the forbidden calls
//! kill it and the allowed ones do not.

use std::sync::OnceLock;

use bulkhead_ipc::seccomp::{
    base, glibc_heap_trim_probe, thread_creation, unix_traffic, AllowList,
};
pub use bulkhead_ipc::seccomp::{SeccompError, SeccompMode};

/// The kinds of thread a VMM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits, stops the vCPUs, flushes and resets devices.
    Main,
    /// A vCPU: KVM_RUN and the exits it dispatches to device models; starts workers.
    Vcpu,
    /// A device's worker: virtqueues, host sockets and the hub, shared memory, disk I/O.
    Worker,
    /// The control socket and the stop-signal thread.
    Control,
}

/// Every kind, for tests and documentation.
pub const ALL_KINDS: [ThreadKind; 4] = [
    ThreadKind::Main,
    ThreadKind::Vcpu,
    ThreadKind::Worker,
    ThreadKind::Control,
];

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Turns filtering on for this process (the VMM binary does, from `--seccomp`). Until then
/// [`apply`] does nothing, so device code used in-process by tests runs unfiltered.
pub fn enable(mode: SeccompMode) {
    let _ = MODE.set(mode);
}

/// Whether [`enable`] was called, and how.
pub fn mode() -> Option<SeccompMode> {
    MODE.get().copied()
}

/// What a device worker needs: virtqueues and guest memory (read/write on descriptors it
/// has, eventfds, KVM ioctls for memory slots and irqfds), disk I/O and flushes, virtio_wl's
/// shared memory (memfd_create, ftruncate, fallocate, mmap) and its host and hub sockets.
fn worker_list() -> AllowList {
    let mut l = base();
    unix_traffic(&mut l);
    l.allow(&[
        libc::SYS_memfd_create,
        // virtio_wl makes its memfds mode 0644 (`MEMFD_MODE`, so another uid cannot reopen
        // them writable through /proc).
        libc::SYS_fchmod,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_pipe2,
    ]);
    l
}

/// The allow-list of one kind.
pub fn allow_list(kind: ThreadKind) -> AllowList {
    let mut l = kind_list(kind);
    // Every kind: a `free` trims the heap the memory came from, whichever thread frees it
    // (a vCPU dropping the devices, a worker clearing its state, main at the end).
    glibc_heap_trim_probe(&mut l);
    l
}

fn kind_list(kind: ThreadKind) -> AllowList {
    match kind {
        ThreadKind::Worker => worker_list(),
        ThreadKind::Vcpu => {
            // Everything a worker needs (it starts them and they inherit this filter), the
            // vCPU's own KVM ioctls (already in base's ioctl rule), and thread creation.
            let mut l = worker_list();
            thread_creation(&mut l);
            l.signals_to_self_only();
            l
        }
        ThreadKind::Control => {
            // Accept and serve control clients (descriptors come with `wl add`), press the
            // power button, wait for SIGTERM/SIGINT.
            let mut l = base();
            unix_traffic(&mut l);
            l.allow(&[libc::SYS_rt_sigtimedwait]);
            l
        }
        ThreadKind::Main => {
            // Wait for the end, kick the vCPUs (signals to its own threads), join every
            // thread, flush and fsync disks, reset VFIO devices, remove its control socket
            // path, log.
            let mut l = base();
            unix_traffic(&mut l);
            l.signals_to_self_only().allow(&[
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ]);
            l
        }
    }
}

/// Installs `kind`'s filter on the calling thread, if filtering is on.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    match mode() {
        Some(mode) => allow_list(kind).install(mode),
        None => Ok(()),
    }
}

/// [`apply`] for a thread that cannot return an error: a failure is logged and ends the
/// process (a thread without its filter must not go on to read guest input).
pub fn apply_or_exit(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        log::error!("bulkhead-vmm: cannot install the {kind:?} seccomp filter: {e}");
        std::process::exit(1);
    }
}
