//! The hub's one `poll(2)` loop: which fds it waits on (and for what), dispatching what is
//! ready, and the periodic sweep (memfd server, probes, audit coalescing).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Instant;

use crate::channel::close_fds;

use bulkhead_policy::Rights;

use super::conn::Side;
use super::end::{At, End};
use super::handles::VmIdx;
use super::memfd_server;
use super::protocol::ConnId;
use super::{Hub, HubError, STALL_RETRY, SWEEP_INTERVAL};

#[derive(Clone, Copy)]
pub(super) enum Src {
    Vm(VmIdx),
    End(At),
    Target(ConnId),
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
            self.grant_ready();
            let timeout = if std::mem::take(&mut self.stalled) {
                self.retry_stalled();
                libc::c_int::try_from(STALL_RETRY.as_millis()).unwrap_or(5)
            } else {
                1000
            };
            let (mut pfds, srcs) = self.poll_set();
            let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: pfds is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout) };
            if n < 0 {
                let e = nix::errno::Errno::last();
                if e == nix::errno::Errno::EINTR {
                    continue;
                }
                return Err(HubError::Poll(e));
            }
            if (n == 0 && timeout >= 1000) || self.last_sweep.elapsed() >= SWEEP_INTERVAL {
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
        let queue = self.budgets.queue;
        for (i, vm) in self.vms.iter().enumerate() {
            if let Some(ch) = &vm.chan {
                let mut ev = 0;
                if vm.out.len() + vm.closed.len() < self.budgets.events {
                    ev |= libc::POLLIN;
                }
                if !vm.out.is_empty() {
                    ev |= libc::POLLOUT;
                }
                // With neither, POLLHUP still reports a VMM that went away.
                push(ch.as_fd(), ev, Src::Vm(i));
            }
        }
        // An end the hub read EOF from has nothing more to give (and its VMM is gone);
        // one that hung up while the hub was not reading it is left out until there is
        // room to read the rest (POLLHUP alone would make the loop spin).
        let end_events = |me: &End| {
            let mut ev = 0;
            if !me.eof && me.out.len() < queue {
                ev |= libc::POLLIN;
            }
            if !me.out.is_empty() {
                ev |= libc::POLLOUT;
            }
            let skip = me.eof || (me.hung_up && ev == 0);
            (skip, ev)
        };
        for (id, c) in &self.conns {
            for s in [Side::Client, Side::Provider] {
                let me = c.end(s);
                let (skip, ev) = end_events(me);
                if !skip {
                    push(me.sock.as_fd(), ev, Src::End(At::Conn(*id, s)));
                }
            }
        }
        for (id, m) in &self.meds {
            let (skip, ev) = end_events(&m.end);
            if !skip {
                push(m.end.sock.as_fd(), ev, Src::End(At::Med(*id)));
            }
            let t = &m.target;
            let mut ev = 0;
            if !t.eof && m.rights.contains(Rights::RECV) && m.end.out.len() < queue {
                ev |= libc::POLLIN;
            }
            if !t.out.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                push(t.sock.as_fd(), ev, Src::Target(*id));
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
                if revents & (libc::POLLIN | libc::POLLERR) != 0 {
                    self.read_vm(i);
                } else if revents & libc::POLLHUP != 0 {
                    // Gone, while the hub was not reading it (its queue full): nothing it
                    // asked for will be read.
                    self.read_vm(i);
                    if self.vms.get(i).is_some_and(|v| v.chan.is_some()) && !self.events_room(i) {
                        self.vm_gone(i);
                    }
                }
            }
            Src::End(at) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_end(at);
                    match at {
                        At::Conn(id, _) => self.finish_if_drained(id),
                        At::Med(id) => self.finish_med_if_drained(id),
                    }
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_end(at);
                }
                if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    if let Some(e) = self.end_mut(at) {
                        e.hung_up = true;
                    }
                }
            }
            Src::Target(id) => {
                if revents & libc::POLLOUT != 0 {
                    self.flush_target(id);
                    self.finish_med_if_drained(id);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read_target(id);
                    self.bury();
                    self.flush_end(At::Med(id));
                }
            }
            Src::Listener => self.accept_control(),
            Src::Client => self.serve_control(),
        }
    }

    /// Tries again the sends that stopped for fds in flight or a kernel resource.
    fn retry_stalled(&mut self) {
        let ends: Vec<At> = self
            .conns
            .iter()
            .flat_map(|(id, c)| {
                [Side::Client, Side::Provider]
                    .into_iter()
                    .filter(|s| !c.end(*s).out.is_empty())
                    .map(|s| At::Conn(*id, s))
            })
            .chain(
                self.meds
                    .iter()
                    .filter(|(_, m)| !m.end.out.is_empty())
                    .map(|(id, _)| At::Med(*id)),
            )
            .collect();
        for at in ends {
            self.flush_end(at);
        }
        let targets: Vec<ConnId> = self
            .meds
            .iter()
            .filter(|(_, m)| !m.target.out.is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in targets {
            self.flush_target(id);
        }
        let vms: Vec<VmIdx> = (0..self.vms.len()).collect();
        for vm in vms {
            self.flush_vm(vm);
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
