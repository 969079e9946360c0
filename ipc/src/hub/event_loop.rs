//! The hub's one `poll(2)` loop: which fds it waits on (and for what), dispatching what is
//! ready, and the periodic sweep (memfd server, probes, audit coalescing).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Instant;

use crate::channel::close_fds;

use super::conn::{other, Side};
use super::handles::VmIdx;
use super::memfd_server;
use super::protocol::ConnId;
use super::{Hub, HubError, SWEEP_INTERVAL};

#[derive(Clone, Copy)]
pub(super) enum Src {
    Vm(VmIdx),
    Conn(ConnId, Side),
    Listener,
    Client,
}

impl Hub {
    /// Runs the poll loop. Returns when every VM channel has closed (if configured so).
    pub fn run(&mut self) -> Result<(), HubError> {
        loop {
            if self.exit_when_no_vms && self.vms.iter().all(|v| v.chan.is_none()) {
                return Ok(());
            }
            let (mut pfds, srcs) = self.poll_set();
            let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: pfds is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, 1000) };
            if n < 0 {
                let e = nix::errno::Errno::last();
                if e == nix::errno::Errno::EINTR {
                    continue;
                }
                return Err(HubError::Poll(e));
            }
            if n == 0 || self.last_sweep.elapsed() >= SWEEP_INTERVAL {
                self.sweep_memfds();
            }
            if n == 0 {
                continue;
            }
            for (p, src) in pfds.iter().zip(srcs) {
                if p.revents == 0 {
                    continue;
                }
                self.dispatch(src, p.revents);
            }
            self.bury();
        }
    }

    /// Closes the fds the hub is done with.
    pub(super) fn bury(&mut self) {
        close_fds(&mut self.grave);
    }

    pub(super) fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Src>) {
        let mut pfds = Vec::new();
        let mut srcs = Vec::new();
        let mut push = |fd: BorrowedFd<'_>, events: libc::c_short, src: Src| {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            });
            srcs.push(src);
        };
        for (i, vm) in self.vms.iter().enumerate() {
            if let Some(ch) = &vm.chan {
                let mut ev = libc::POLLIN;
                if !vm.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                push(ch.as_fd(), ev, Src::Vm(i));
            }
        }
        for (id, c) in &self.conns {
            for s in [Side::Client, Side::Provider] {
                let me = c.end(s);
                let mut ev = 0;
                if c.end(other(s)).out.len() < self.queue_limit && me.out.len() < self.queue_limit {
                    ev |= libc::POLLIN;
                }
                if !me.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                if me.eof || (me.hung_up && ev == 0) {
                    continue;
                }
                push(me.sock.as_fd(), ev, Src::Conn(*id, s));
            }
        }
        if let Some(l) = &self.control {
            push(l.as_fd(), libc::POLLIN, Src::Listener);
        }
        for c in &self.clients {
            push(c.as_fd(), libc::POLLIN, Src::Client);
        }
        (pfds, srcs)
    }

    pub(super) fn dispatch(&mut self, src: Src, revents: libc::c_short) {
        match src {
            Src::Vm(i) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_vm(i);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_vm(i);
                }
            }
            Src::Conn(id, s) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_conn(id, s);
                    self.finish_if_drained(id);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_conn(id, s);
                }
                if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.end_mut(s).hung_up = true;
                    }
                }
            }
            Src::Listener => self.accept_control(),
            Src::Client => self.serve_control(),
        }
    }

    pub(super) fn sweep_memfds(&mut self) {
        // The cache's own descriptions and fds waiting to be closed would count as holders:
        // drop them first.
        self.ro_cache.clear();
        self.bury();
        self.audit.flush();
        self.last_sweep = Instant::now();
        for key in self.memfd.sweep() {
            self.handles.forget_object(key);
        }
        self.handles.sweep_probes(memfd_server::still_held);
    }
}
