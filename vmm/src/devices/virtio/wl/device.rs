//! The virtio_wl device (ID 63): two queues (0 = in, device → guest; 1 = out, guest →
//! device), a 4 GiB shared-memory region (shmid 0) where shm vfds are mapped, and a worker
//! thread that polls the queues and the host fds of the vfds.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{VIRTIO_ID_WL, VIRTIO_WL_F_TRANS_FLAGS, VIRTIO_WL_F_USE_SHMEM};
use super::sockets::WlSockets;
use super::state::{WlLimits, WlState};
use super::vfd::{ShmWindow, SHM_WINDOW_SIZE};
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

/// The virtio_wl device.
pub struct Wl {
    sockets: WlSockets,
    state: Arc<Mutex<WlState>>,
    worker: Option<WlWorker>,
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
            worker: None,
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
    fn set_shm_regions(&mut self, regions: &[ShmRegion]) {
        if let Some(r) = regions.iter().find(|r| r.id == SHM_REGION_ID) {
            lock(&self.state).move_window(r.guest_addr);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for q in [IN_QUEUE, OUT_QUEUE] {
            if !activation.queues.iter().any(|a| a.index == q) {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        lock(&self.state).set_features(activation.features);
        self.worker =
            Some(WlWorker::spawn(self.state.clone(), activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
        lock(&self.state).clear();
    }
}

/// The worker thread; dropping it stops and joins it.
pub struct WlWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WlWorker {
    /// Starts serving `activation`'s queues with `state`.
    pub fn spawn(state: Arc<Mutex<WlState>>, activation: Activation) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_thread = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("virtio-wl".into())
            .spawn(move || run(&state, activation, &stop_thread))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for WlWorker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

/// Interrupts the driver for queue `index` unless it said (`used_event`, with EVENT_IDX) it
/// does not want to hear of these buffers yet.
fn notify(interrupt: &dyn VirtioInterrupt, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.notify_queue(index);
    }
}

/// Asks the driver for a notification when it makes the next buffer available (with
/// EVENT_IDX, `avail_event` = the next one; without it, notifications are always on). True if
/// buffers came in meanwhile: process again, or one would be missed.
fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.enable_notification(mem).unwrap_or(false)
}

fn run(state: &Mutex<WlState>, activation: Activation, stop: &EventFd) {
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
        // Work first (buffers may have been posted before activation), then wait.
        {
            let mut st = lock(state);
            // Every command is wanted: a notification for the next one.
            if let Some(q) = queues.get_mut(out_pos) {
                loop {
                    if st.process_out(&mut q.queue, &mem) {
                        notify(interrupt.as_ref(), OUT_QUEUE, &mut q.queue, &mem);
                    }
                    if !rearm(&mut q.queue, &mem) {
                        break;
                    }
                }
            }
            // Deliveries a SEND read while it waited for its verdict.
            st.read_buffered();
            // In-queue buffers matter only when a message waits for one: with EVENT_IDX the
            // guest posts them back without a notification otherwise (one exit less per
            // message received).
            if let Some(q) = queues.get_mut(in_pos) {
                loop {
                    if st.process_in(&mut q.queue, &mem) {
                        notify(interrupt.as_ref(), IN_QUEUE, &mut q.queue, &mem);
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
        let mut fds = Vec::with_capacity(4 + watched.len());
        let pfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        fds.push(pfd(stop.as_raw_fd()));
        for pos in [out_pos, in_pos] {
            fds.push(pfd(queues.get(pos).map_or(-1, |q| q.notify.as_raw_fd())));
        }
        // The hub channel (faux accepts, closes) is polled even under back-pressure: its
        // events only touch the registry and listener contexts, never the in queue.
        fds.push(pfd(hub_fd.unwrap_or(-1)));
        fds.extend(watched.iter().map(|(_, fd)| pfd(*fd)));
        // SAFETY: `fds` is a valid pollfd array for the duration of the call (a -1 entry is
        // ignored by poll); the watched fds stay open because only this thread closes vfds
        // (commands run here) — a device reset stops this thread before clearing the table;
        // the hub channel is owned by the state and never closed while it lives.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("bulkhead-vmm: virtio-wl: poll failed");
            return;
        }
        if fds.first().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (pos, p) in [out_pos, in_pos].into_iter().zip(fds.iter().skip(1)) {
            if p.revents != 0 {
                if let Some(q) = queues.get(pos) {
                    let _ = q.notify.read();
                }
            }
        }
        let mut st = lock(state);
        if fds.get(3).is_some_and(|p| p.revents != 0) {
            st.read_hub();
        }
        for ((id, _), p) in watched.iter().zip(fds.iter().skip(4)) {
            if p.revents != 0 {
                st.read_vfd(*id);
            }
        }
    }
}
