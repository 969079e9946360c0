//! Host setup that can hang in the kernel runs in a child process: loading kernel modules
//! (a module's init function runs inside finit_module(2)) and binding PCI functions to
//! vfio-pci (a driver's remove and probe run inside the sysfs writes). PID 1 starts it
//! once its signalfd and control socket are up, keeps answering while it runs, and stops
//! waiting after a deadline ([`crate::runtime::Runtime::wait_for_setup`]). A wedged driver
//! then leaves a child stuck in the kernel, never PID 1.
//!
//! The child reports what the services need from it (the IOMMU groups bound for each VM)
//! on a pipe, one line per group: `group <vm> <n>`. It logs as init does (same console and
//! kmsg, same tag), with signals unblocked and default dispositions, so the shutdown's
//! kill(-1) ends it unless it is stuck in the kernel.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use log::warn;
use nix::unistd::{fork, ForkResult, Pid};

use crate::devices::VmGroups;

/// Most bytes of reports read (a line per granted IOMMU group).
const MAX_REPORT: usize = 64 * 1024;

/// The setup child, seen from PID 1.
#[derive(Debug)]
pub struct Setup {
    pid: Pid,
    reports: File,
    buf: Vec<u8>,
    finished: bool,
}

/// The report lines for `groups`.
pub fn encode(groups: &VmGroups) -> String {
    let mut out = String::new();
    for (vm, gs) in groups {
        for g in gs {
            out.push_str(&format!("group {vm} {g}\n"));
        }
    }
    out
}

/// The groups in report lines; lines that do not parse are skipped.
pub fn decode(text: &str) -> VmGroups {
    let mut groups = VmGroups::new();
    for line in text.lines() {
        let mut w = line.split(' ');
        let (Some("group"), Some(vm), Some(g), None) = (w.next(), w.next(), w.next(), w.next())
        else {
            continue;
        };
        let Ok(g) = g.parse::<u32>() else { continue };
        let gs = groups.entry(vm.to_string()).or_default();
        if !gs.contains(&g) {
            gs.push(g);
        }
    }
    groups
}

impl Setup {
    /// Forks a child that runs `work` and reports its result. Call it while the process
    /// is single-threaded (PID 1 always is).
    pub fn start(work: impl FnOnce() -> VmGroups) -> std::io::Result<Setup> {
        use nix::fcntl::OFlag;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let sigrtmax = libc::SIGRTMAX();
        // SAFETY: the caller is single-threaded, so the child may run ordinary code (no lock
        // can be held by a thread that does not exist in it). The child never returns from
        // this function: it ends with _exit whatever happens, panics included.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(r);
                let _ = crate::signals::reset_in_child(sigrtmax);
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
                let code = match result {
                    Ok(groups) => {
                        let mut w = File::from(w);
                        // Both ends are non-blocking; the report is far smaller than a
                        // pipe's buffer, so it goes out whole.
                        let _ = w.write_all(encode(&groups).as_bytes());
                        0
                    }
                    Err(_) => 101,
                };
                // SAFETY: _exit ends this child at once, without running anything of PID 1's
                // (atexit handlers, destructors of objects it shares with PID 1).
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(w);
                Ok(Setup {
                    pid: child,
                    reports: File::from(r),
                    buf: Vec::new(),
                    finished: false,
                })
            }
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Reads what the child has written; true once it has finished (end of file).
    pub fn read(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        while !self.finished {
            match self.reports.read(&mut chunk) {
                Ok(0) => self.finished = true,
                Ok(n) => {
                    if self.buf.len() + n > MAX_REPORT {
                        warn!(
                            "setup (pid {}) reported too much; ignoring the rest",
                            self.pid
                        );
                        self.finished = true;
                    } else {
                        self.buf
                            .extend_from_slice(chunk.get(..n).unwrap_or_default());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("setup (pid {}): {e}", self.pid);
                    self.finished = true;
                }
            }
        }
        self.finished
    }

    /// True once the child has finished reporting.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// What the child reported (everything, if it finished; what came so far otherwise).
    pub fn groups(&self) -> VmGroups {
        decode(&String::from_utf8_lossy(&self.buf))
    }
}

impl AsFd for Setup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reports.as_fd()
    }
}

/// Fault injection (`bulkhead.test_hang=setup`): the setup child sleeps for ever instead
/// of working, as one stuck in a driver would (but killable, so shutdown still ends it).
pub fn fake_hang() -> ! {
    log::warn!("setup: hanging on purpose (bulkhead.test_hang=setup)");
    loop {
        nix::unistd::pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let mut g = VmGroups::new();
        g.insert("edu-vm".into(), vec![3, 7]);
        g.insert("net-vm".into(), vec![1]);
        assert_eq!(decode(&encode(&g)), g);
        assert_eq!(
            decode("group a 1\ngarbage\ngroup b x\ngroup a 1\ngroup c 2 extra\n"),
            VmGroups::from([("a".to_string(), vec![1])])
        );
    }
}
