//! Per-VM budgets: what the hub spends on one VM, and the bounds that keep one VM from
//! spending what the others need.
//!
//! The hub is one process shared by every VM, so everything it holds on a VM's behalf comes
//! out of common pools: its fd table (`RLIMIT_NOFILE`, `EMFILE`), the kernel's count of fds
//! it has in flight in sockets (`ETOOMANYREFS` once past `RLIMIT_NOFILE`), its memory, the
//! tombstone table, the VM channels' event queues. Each VM gets a share of each, and a VM past
//! its share is slowed (the hub stops sending to it until it reads) or refused (`Busy`),
//! while every other VM goes on as before:
//!
//! | budget | what counts | past it |
//! |---|---|---|
//! | `fds` | fds the hub holds for the VM: in frames queued toward it and in sends from it not yet complete | sends toward it `Busy`; its own long send `Busy` |
//! | `bytes` | bytes of those frames | the same |
//! | `inflight` | fds the hub sent to the VM's sockets that its VMM has not received yet | the hub sends it nothing more until it reads |
//! | `events` | events queued on its VM channel | `Connect`s to its services `Busy`; its own requests wait (the hub stops reading them); `Closed` notices are kept as a set and never dropped |
//! | `queue` | events queued toward one side of one connection | sends toward that side `Busy` |
//! | `tombstones` | tombstones of objects it held (`handles.rs`) | its `Release` of such an object is not honoured (it keeps the entry, against its own `vfds`) |
//! | `conns` | connections it opened as a client, plus sockets mediated for it | `Connect` refused; a socket for it `Busy` |
//!
//! The fd budgets are fitted to the hub's `RLIMIT_NOFILE` at start ([`Budgets::fit`]), so
//! that the hub can never run out of fds or reach `ETOOMANYREFS` however the VMs behave.
//! And if the kernel says `ETOOMANYREFS`, `EMFILE` or `ENOBUFS` anyway, that is
//! back-pressure: the frames stay queued and go out later (`queue::is_resource`).

/// Budgets for each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// fds held for one VM (queued toward it, and in its unfinished sends).
    pub fds: usize,
    /// Bytes held for one VM (the same frames).
    pub bytes: usize,
    /// fds in flight to one VM's sockets.
    pub inflight: usize,
    /// Events queued on one VM channel.
    pub events: usize,
    /// Events queued toward one side of one connection.
    pub queue: usize,
    /// Tombstones charged to one VM.
    pub tombstones: usize,
    /// Connections (as a client, and mediated sockets) of one VM.
    pub conns: usize,
}

/// Default [`Budgets::fds`].
pub const DEFAULT_VM_FDS: usize = 1024;
/// Default [`Budgets::bytes`] (a few of the largest sends).
pub const DEFAULT_VM_BYTES: usize = 8 << 20;
/// Default [`Budgets::inflight`].
pub const DEFAULT_VM_INFLIGHT: usize = 1024;
/// Default [`Budgets::tombstones`].
pub const DEFAULT_VM_TOMBSTONES: usize = 1024;
/// fds the hub needs whatever the VMs do: its VM channels, control socket and clients,
/// audit log, `/proc/self/fd`, policy loading, one receive batch (32 × 28), the read-only
/// cache (256), and headroom.
pub const RESERVED_FDS: usize = 2048;

/// The least a fitted budget may be: one frame's fds.
const MIN_FDS: usize = crate::frame::MAX_FDS;

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets::new(super::DEFAULT_QUEUE, super::DEFAULT_MAX_CONNS_PER_VM)
    }
}

impl Budgets {
    /// The defaults, with `queue` frames per connection side and `conns` connections.
    pub fn new(queue: usize, conns: usize) -> Budgets {
        Budgets {
            fds: DEFAULT_VM_FDS,
            bytes: DEFAULT_VM_BYTES,
            inflight: DEFAULT_VM_INFLIGHT,
            events: queue.saturating_mul(4).max(1),
            queue: queue.max(1),
            tombstones: DEFAULT_VM_TOMBSTONES,
            conns,
        }
    }

    /// fds the hub needs for `vms` VMs under these budgets: each VM's held and in-flight
    /// fds, two per connection (the hub's ends), and [`RESERVED_FDS`]. The memfd server's
    /// probes (one per live allocation) and the handle table's (one per attenuated memfd)
    /// come on top, bounded by the policy's `quota shm-count=` and `vfds=`.
    pub fn fds_needed(&self, vms: usize) -> usize {
        let per_vm = self
            .fds
            .saturating_add(self.inflight)
            .saturating_add(self.conns.saturating_mul(2));
        per_vm.saturating_mul(vms).saturating_add(RESERVED_FDS)
    }

    /// Shrinks the fd budgets (held, in flight, connections; never below one frame's fds)
    /// until [`Budgets::fds_needed`] fits `nofile`. Returns whether they had to shrink.
    pub fn fit(&mut self, nofile: usize, vms: usize) -> bool {
        if vms == 0 || self.fds_needed(vms) <= nofile {
            return false;
        }
        let per_vm = nofile.saturating_sub(RESERVED_FDS) / vms;
        // Half for connections' sockets, a quarter each for held and in-flight fds.
        self.conns = self.conns.min((per_vm / 4).max(1));
        self.fds = self.fds.min((per_vm / 4).max(MIN_FDS));
        self.inflight = self.inflight.min((per_vm / 4).max(MIN_FDS));
        true
    }
}

/// What the hub spends on one VM now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// fds held (queued toward it, in its unfinished sends).
    pub fds: usize,
    /// Bytes held.
    pub bytes: usize,
    /// fds in flight to its sockets (an upper bound: see `conn::End::inflight`).
    pub inflight: usize,
}

impl Usage {
    /// Adds what was queued or received.
    pub fn hold(&mut self, fds: usize, bytes: usize) {
        self.fds = self.fds.saturating_add(fds);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Takes off what left the queue (sent, or dropped).
    pub fn release(&mut self, fds: usize, bytes: usize) {
        self.fds = self.fds.saturating_sub(fds);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Would `fds` and `bytes` more go past `b`? A VM holding nothing may always take one
    /// send, however large, so that no budget is smaller than the largest send.
    pub fn over(&self, b: &Budgets, fds: usize, bytes: usize) -> bool {
        if self.fds == 0 && self.bytes == 0 {
            return false;
        }
        self.fds.saturating_add(fds) > b.fds || self.bytes.saturating_add(bytes) > b.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_fit_the_fd_limit() {
        let mut b = Budgets::new(64, 256);
        assert!(!b.fit(1 << 20, 8));
        let before = b;
        assert!(!b.fit(65536, 16));
        assert!(b.fit(16384, 16));
        assert!(b.fds_needed(16) <= 16384, "{b:?}");
        assert!(b.fds < before.fds || b.conns < before.conns);
        let mut tiny = Budgets::new(64, 256);
        tiny.fit(1024, 4);
        assert!(tiny.fds >= MIN_FDS && tiny.inflight >= MIN_FDS && tiny.conns >= 1);
    }

    #[test]
    fn an_empty_vm_always_takes_one_send() {
        let b = Budgets::new(64, 256);
        let u = Usage::default();
        assert!(!u.over(&b, 28, 1 << 20));
        let u = Usage {
            fds: b.fds,
            bytes: 0,
            inflight: 0,
        };
        assert!(u.over(&b, 1, 0));
        assert!(!u.over(&b, 0, 0));
    }
}
