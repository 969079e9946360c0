//! Test only (`--test-escape ATTEMPT`, hidden): what a guest that has taken over the VMM
//! would try first, made from a thread under the vCPU filter (the widest one, and the kind
//! of thread that parses guest exits) inside the jail init built. Each attempt should be
//! stopped: killed by seccomp (init says `killed by seccomp (SIGSYS)`), killed by the OOM
//! killer at the cgroup's memory.max (init says so), or refused with an error (exit 1). A
//! VMM that got through says `NOT STOPPED` and exits 7.

use bulkhead_vmm::seccomp::{self, ThreadKind};
use bulkhead_vmm::vstate::exit::ExitReason;

/// The attempts, by name.
pub const ATTEMPTS: &[&str] = &[
    "open-host-file",
    "socket-inet",
    "ptrace",
    "mount",
    "ofd-unlock",
    "fork",
    "kill",
    "memory",
];

/// Makes one attempt; returns only if it was refused with an error or got through.
pub fn attempt(name: &str) -> ExitReason {
    if !ATTEMPTS.contains(&name) {
        return ExitReason::VmmError(format!(
            "--test-escape {name}: one of {}",
            ATTEMPTS.join(", ")
        ));
    }
    let name = name.to_string();
    let thread = std::thread::Builder::new()
        .name("vcpu-escape".into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(ThreadKind::Vcpu) {
                return Err(format!("cannot install the vCPU filter: {e}"));
            }
            log::info!("bulkhead-vmm: escape {name}: trying from a vCPU-filtered thread");
            try_it(&name)
        });
    let result = match thread {
        Ok(t) => t
            .join()
            .unwrap_or_else(|_| Err("the attempt panicked".into())),
        Err(e) => Err(format!("cannot start the attempt's thread: {e}")),
    };
    match result {
        Ok(what) => {
            log::error!("bulkhead-vmm: escape NOT STOPPED: {what}");
            std::process::exit(7)
        }
        Err(e) => ExitReason::VmmError(format!("escape refused: {e}")),
    }
}

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// Ok(what got through) or Err(how it was refused).
fn try_it(name: &str) -> Result<String, String> {
    // SAFETY: raw system calls on NUL-terminated literals, live locals, or memory this
    // function mapped itself; every result is checked.
    unsafe {
        match name {
            "open-host-file" => {
                let fd = libc::open(c"/etc/bulkhead/system.toml".as_ptr(), libc::O_RDONLY);
                if fd >= 0 {
                    Ok("opened /etc/bulkhead/system.toml".into())
                } else {
                    Err(errno())
                }
            }
            "socket-inet" => {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if fd >= 0 {
                    Ok("made an AF_INET socket".into())
                } else {
                    Err(errno())
                }
            }
            "ptrace" => {
                if libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) == 0 {
                    Ok("attached to pid 1".into())
                } else {
                    Err(errno())
                }
            }
            "mount" => {
                let r = libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                );
                if r == 0 {
                    Ok("mounted a tmpfs".into())
                } else {
                    Err(errno())
                }
            }
            "ofd-unlock" => {
                let fd = libc::memfd_create(c"probe".as_ptr(), libc::MFD_CLOEXEC);
                if fd < 0 {
                    return Err(format!("memfd_create: {}", errno()));
                }
                let lock = libc::flock {
                    l_type: libc::F_UNLCK as i16,
                    l_whence: 0,
                    l_start: 0,
                    l_len: 0,
                    l_pid: 0,
                };
                if libc::fcntl(fd, libc::F_OFD_SETLK, &lock) == 0 {
                    Ok("released an OFD lock".into())
                } else {
                    Err(errno())
                }
            }
            "fork" => match libc::fork() {
                0 => libc::_exit(0),
                pid if pid > 0 => Ok(format!("forked pid {pid}")),
                _ => Err(errno()),
            },
            "kill" => {
                if libc::kill(1, libc::SIGTERM) == 0 {
                    Ok("signalled pid 1".into())
                } else {
                    Err(errno())
                }
            }
            "memory" => {
                // 16 MiB at a time, every page touched, up to 64 GiB.
                const CHUNK: usize = 16 << 20;
                for i in 0..4096usize {
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        CHUNK,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    if p == libc::MAP_FAILED {
                        return Err(format!("mmap after {} MiB: {}", i * 16, errno()));
                    }
                    std::ptr::write_bytes(p.cast::<u8>(), 0xa5, CHUNK);
                    if i % 16 == 0 {
                        log::info!("bulkhead-vmm: escape memory: {} MiB touched", (i + 1) * 16);
                    }
                }
                Ok("touched 64 GiB".into())
            }
            _ => Err("unknown attempt".into()),
        }
    }
}
