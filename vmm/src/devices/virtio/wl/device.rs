//! The virtio_wl device (ID 63): two queues (0 = in, device → guest; 1 = out, guest →
//! device), a 4 GiB shared-memory region (shmid 0) where shm vfds are mapped, and a worker
//! thread that polls the queues and the host fds of the vfds.
//!
//! The worker holds the state's lock while it serves a command, which may wait (a send to
//! a peer that is not reading, a hub answer), so nothing a vCPU does waits for that lock:
//! a guest reset tells the worker to stop (it checks between chains, clears the state
//! itself and exits; the transport shows the guest a non-zero status until it has), and a
//! move of BAR 2 is handed to the worker when the lock is busy.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{VIRTIO_ID_WL, VIRTIO_WL_F_TRANS_FLAGS, VIRTIO_WL_F_USE_SHMEM};
use super::sockets::WlSockets;
use super::state::{WlLimits, WlState};
use super::vfd::{ShmWindow, SHM_WINDOW_SIZE};
use crate::devices::virtio::worker::{StopSignal, WorkerSlot, WorkerThread};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, ShmRegion, ShmRegionSpec, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::memory_slots::MemorySlots;
use virtio_queue::{Queue, QueueT};

/// Queue index of the in queue (device → guest).
pub const IN_QUEUE: usize = 0;
/// Queue index of the out queue (guest → device).
pub const OUT_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// The shared-memory region id of the vfd window.
pub const SHM_REGION_ID: u8 = 0;

/// A move of the shared-memory window that waits for the state's lock: whoever holds the
/// lock next applies it (the worker, woken by `wake`, or the next activation).
struct WindowMove {
    base: Mutex<Option<u64>>,
    wake: EventFd,
}

impl WindowMove {
    fn apply(&self, st: &mut WlState) {
        let base = self.base.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(b) = base {
            st.move_window(b);
        }
    }
}

/// The virtio_wl device.
pub struct Wl {
    sockets: WlSockets,
    state: Arc<Mutex<WlState>>,
    worker: WorkerSlot,
    window_move: Arc<WindowMove>,
    /// Fault injection: interrupts still to drop (see [`Wl::drop_interrupts`]).
    dropped: Arc<AtomicU32>,
}

fn lock(state: &Mutex<WlState>) -> MutexGuard<'_, WlState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Wl {
    /// A device connecting to `sockets`, mapping shared memory through `slots` (None: shm vfds
    /// are allocated but not mapped into a guest; for tests without KVM).
    pub fn new(
        sockets: WlSockets,
        slots: Option<Arc<MemorySlots>>,
        limits: WlLimits,
    ) -> Result<Self, std::io::Error> {
        let window = ShmWindow::new(slots, 0)
            .map_err(|e| std::io::Error::other(format!("shm window: {e}")))?;
        Ok(Self {
            sockets: sockets.clone(),
            state: Arc::new(Mutex::new(WlState::new(sockets, window, limits))),
            worker: WorkerSlot::default(),
            window_move: Arc::new(WindowMove {
                base: Mutex::new(None),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
            dropped: Arc::new(AtomicU32::new(0)),
        })
    }

    /// The named sockets (shared with the control socket's `wl add`).
    pub fn sockets(&self) -> &WlSockets {
        &self.sockets
    }

    /// Resolves names the registry does not have through the hub (`--hub-fd`).
    pub fn set_hub(&mut self, hub: super::hub::HubLink) {
        lock(&self.state).set_hub(hub);
    }

    /// Fault injection (tests only): the next `n` interrupts of either queue are not sent,
    /// though their buffers are used, as when an interrupt is lost on its way to the guest.
    pub fn drop_interrupts(&mut self, n: u32) {
        self.dropped.store(n, Ordering::Relaxed);
    }

    /// The state (tests inspect it).
    pub fn state(&self) -> &Arc<Mutex<WlState>> {
        &self.state
    }
}

impl VirtioDevice for Wl {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_WL
    }
    fn name(&self) -> &str {
        "wl"
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_WL_F_TRANS_FLAGS
            | VIRTIO_WL_F_USE_SHMEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    fn shm_regions(&self) -> Vec<ShmRegionSpec> {
        vec![ShmRegionSpec {
            id: SHM_REGION_ID,
            size: SHM_WINDOW_SIZE,
        }]
    }
    /// Never waits for the state's lock (the worker may hold it across a wait): if it is
    /// busy, the worker applies the move before its next command.
    fn set_shm_regions(&mut self, regions: &[ShmRegion]) {
        let Some(r) = regions.iter().find(|r| r.id == SHM_REGION_ID) else {
            return;
        };
        *self
            .window_move
            .base
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(r.guest_addr);
        match self.state.try_lock() {
            Ok(mut st) => self.window_move.apply(&mut st),
            Err(TryLockError::Poisoned(p)) => self.window_move.apply(&mut p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                let _ = self.window_move.wake.write(1);
            }
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for q in [IN_QUEUE, OUT_QUEUE] {
            if !activation.queues.iter().any(|a| a.index == q) {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        // No worker runs now, so the lock is free (or held for a moment by a test).
        if self.worker.pending() {
            return Err(ActivateError::StillStopping);
        }
        {
            let mut st = lock(&self.state);
            self.window_move.apply(&mut st);
            st.set_features(activation.features);
        }
        let state = self.state.clone();
        let window_move = self.window_move.clone();
        let dropped = self.dropped.clone();
        let thread = WorkerThread::spawn("virtio-wl", move |stop| {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
            run(&state, &window_move, &dropped, activation, &stop);
            // Whatever ended the loop (a reset, mostly), the guest's vfds go with it.
            lock(&state).clear();
        })
        .map_err(ActivateError::Worker)?;
        self.worker.start(thread);
        Ok(())
    }
    /// Tells the worker to stop; it clears the state when it exits.
    fn reset(&mut self) {
        self.worker.stop();
    }
    fn reset_pending(&mut self) -> bool {
        self.worker.pending()
    }
}

/// Interrupts the driver for queue `index` unless it said (`used_event`, with EVENT_IDX) it
/// does not want to hear of these buffers yet, or a fault injection drops it.
fn notify(
    interrupt: &dyn VirtioInterrupt,
    dropped: &AtomicU32,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) {
    if queue.needs_notification(mem).unwrap_or(true) {
        let drop = dropped
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if drop {
            log::warn!(
                "bulkhead-vmm: virtio-wl: fault injection: queue {index}'s interrupt dropped"
            );
        } else {
            interrupt.notify_queue(index);
        }
    }
}

/// Asks the driver for a notification when it makes the next buffer available (with
/// EVENT_IDX, `avail_event` = the next one; without it, notifications are always on). True if
/// buffers came in meanwhile: process again, or one would be missed.
fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.enable_notification(mem).unwrap_or(false)
}

fn run(
    state: &Mutex<WlState>,
    window_move: &WindowMove,
    dropped: &AtomicU32,
    activation: Activation,
    stop: &StopSignal,
) {
    let Activation {
        mem,
        mut queues,
        interrupt,
        ..
    } = activation;
    let Some(in_pos) = queues.iter().position(|q| q.index == IN_QUEUE) else {
        return;
    };
    let Some(out_pos) = queues.iter().position(|q| q.index == OUT_QUEUE) else {
        return;
    };
    loop {
        // Work first (buffers may have been posted before activation), then wait. The stop
        // flag is checked between chains: a reset waits for one command at most.
        {
            let mut st = lock(state);
            window_move.apply(&mut st);
            // Every command is wanted: a notification for the next one.
            if let Some(q) = queues.get_mut(out_pos) {
                let go_on = |st: &mut WlState| {
                    window_move.apply(st);
                    !stop.requested()
                };
                loop {
                    if st.process_out_while(&mut q.queue, &mem, go_on) {
                        notify(interrupt.as_ref(), dropped, OUT_QUEUE, &mut q.queue, &mem);
                    }
                    if stop.requested() || !rearm(&mut q.queue, &mem) {
                        break;
                    }
                }
            }
            if stop.requested() {
                return;
            }
            // Deliveries a SEND read while it waited for its verdict.
            st.read_buffered();
            // In-queue buffers matter only when a message waits for one: with EVENT_IDX the
            // guest posts them back without a notification otherwise (one exit less per
            // message received).
            if let Some(q) = queues.get_mut(in_pos) {
                loop {
                    if st.process_in(&mut q.queue, &mem) {
                        notify(interrupt.as_ref(), dropped, IN_QUEUE, &mut q.queue, &mem);
                    }
                    if !(st.backpressured() && rearm(&mut q.queue, &mem)) {
                        break;
                    }
                }
            }
        }
        let (watched, hub_fd) = {
            let st = lock(state);
            (st.watched_fds(), st.hub_fd())
        };
        let mut fds = Vec::with_capacity(5 + watched.len());
        let pfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        fds.push(pfd(stop.eventfd().as_raw_fd()));
        for pos in [out_pos, in_pos] {
            fds.push(pfd(queues.get(pos).map_or(-1, |q| q.notify.as_raw_fd())));
        }
        // The hub channel (faux accepts, closes) is polled even under back-pressure: its
        // events only touch the registry and listener contexts, never the in queue.
        fds.push(pfd(hub_fd.unwrap_or(-1)));
        fds.push(pfd(window_move.wake.as_raw_fd()));
        fds.extend(watched.iter().map(|(_, fd)| pfd(*fd)));
        // SAFETY: `fds` is a valid pollfd array for the duration of the call (a -1 entry is
        // ignored by poll); the watched fds stay open because only this thread closes vfds
        // (commands and the final clear run here); the hub channel is owned by the state and
        // never closed while it lives.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("bulkhead-vmm: virtio-wl: poll failed");
            return;
        }
        if stop.requested() {
            return;
        }
        for (pos, p) in [out_pos, in_pos].into_iter().zip(fds.iter().skip(1)) {
            if p.revents != 0 {
                if let Some(q) = queues.get(pos) {
                    let _ = q.notify.read();
                }
            }
        }
        let _ = window_move.wake.read();
        let mut st = lock(state);
        if fds.get(3).is_some_and(|p| p.revents != 0) {
            st.read_hub();
        }
        for ((id, _), p) in watched.iter().zip(fds.iter().skip(5)) {
            if p.revents != 0 {
                st.read_vfd(*id);
            }
        }
    }
}
