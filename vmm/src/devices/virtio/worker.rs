//! The worker thread of an activated virtio device: waits on its queues' notification
//! eventfds and a stop eventfd, lets the device's `QueueHandler` process the queue, and raises
//! the queue interrupt when buffers were used. Also the thread handling every device shares
//! (`WorkerThread`, `WorkerSlot`): a guest reset tells a thread to stop and never waits for
//! it, since the reset runs on a vCPU holding the device's lock.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, VirtioInterrupt};
use crate::vstate::memory::GuestMemoryMmap;

/// Device logic for processing one queue.
pub trait QueueHandler: Send + 'static {
    /// Consumes the available buffers of queue `index`. Returns true if it added used buffers.
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}

/// The request loop of a simple device: pops every available chain of `queue`, lets
/// `serve` handle its descriptors (returning how many bytes it wrote for the driver), and puts
/// the chain on the used ring. Returns true if any buffer was used. A broken queue or used
/// ring is logged (naming `device`) and ends the loop, never a panic.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    device: &str,
    mut serve: impl FnMut(&[Descriptor]) -> u32,
) -> bool {
    let mut used = false;
    loop {
        let chain = match queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                log::warn!("bulkhead-vmm: virtio-{device}: bad queue: {e:?}");
                return used;
            }
        };
        let Some(chain) = chain else { return used };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let len = serve(&descs);
        if queue.add_used(mem, head, len).is_err() {
            log::warn!("bulkhead-vmm: virtio-{device}: cannot return buffer {head}");
            return used;
        }
        used = true;
    }
}

const STOP_TOKEN: u64 = u64::MAX;

/// What a device thread checks to know it must stop: an eventfd for its poll set and a
/// flag to test between requests. Both are set by [`WorkerThread::request_stop`].
pub struct StopSignal {
    evt: EventFd,
    flag: Arc<AtomicBool>,
}

impl StopSignal {
    /// True once the thread was told to stop.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Becomes readable when the thread must stop.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A device's thread. Telling it to stop never waits ([`WorkerThread::request_stop`]); the
/// thread finishes the request in hand and exits. Only dropping it joins (VM teardown, with
/// no lock held).
pub struct WorkerThread {
    stop: EventFd,
    flag: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts `body` on a thread named `name`, handing it its stop signal.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(StopSignal) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let flag = Arc::new(AtomicBool::new(false));
        let signal = StopSignal {
            evt: stop.try_clone()?,
            flag: flag.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(signal))?;
        Ok(Self {
            stop,
            flag,
            thread: Some(thread),
        })
    }

    /// Tells the thread to stop; does not wait.
    pub fn request_stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
    }

    /// Joins the thread if it has exited (which then takes no time). True once it is gone.
    pub fn try_join(&mut self) -> bool {
        match self.thread.take() {
            Some(t) if t.is_finished() => {
                let _ = t.join();
                true
            }
            Some(t) => {
                self.thread = Some(t);
                false
            }
            None => true,
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.request_stop();
            let _ = t.join();
        }
    }
}

/// A device's worker across guest resets: the running thread, and threads told to stop
/// that have not exited yet. A reset ([`WorkerSlot::stop`]) and the transport's question
/// whether it is over ([`WorkerSlot::pending`]) never wait, so they may be called with the
/// device's and the bus's locks held.
#[derive(Default)]
pub struct WorkerSlot {
    running: Option<WorkerThread>,
    stopping: Vec<WorkerThread>,
}

impl WorkerSlot {
    /// Takes `w` as the running thread (a previous one is told to stop).
    pub fn start(&mut self, w: WorkerThread) {
        self.stop();
        self.running = Some(w);
    }

    /// Tells the running thread to stop; does not wait.
    pub fn stop(&mut self) {
        if let Some(w) = self.running.take() {
            w.request_stop();
            self.stopping.push(w);
        }
    }

    /// True while a thread told to stop has not exited (joins those that have).
    pub fn pending(&mut self) -> bool {
        self.stopping.retain_mut(|w| !w.try_join());
        !self.stopping.is_empty()
    }
}

/// Processes queue `index` once and raises its interrupt if needed.
pub fn run_queue<H: QueueHandler>(
    handler: &mut H,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
) {
    if handler.process(index, queue, mem) && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.notify_queue(index);
    }
}

/// Starts a thread named `name` serving `activation`'s queues with `handler`.
pub fn spawn_queue_worker<H: QueueHandler>(
    name: &str,
    mut handler: H,
    activation: Activation,
) -> std::io::Result<WorkerThread> {
    let epoll = Epoll::new()?;
    for (slot, q) in activation.queues.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, slot as u64),
        )?;
    }
    WorkerThread::spawn(name, move |stop| {
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            stop.eventfd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        ) {
            log::error!("bulkhead-vmm: device worker epoll: {e}");
            return;
        }
        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
        let Activation {
            mem,
            mut queues,
            interrupt,
            ..
        } = activation;
        let interrupt: Arc<dyn VirtioInterrupt> = interrupt;
        // Buffers made available before activation.
        for q in queues.iter_mut() {
            run_queue(
                &mut handler,
                q.index,
                &mut q.queue,
                &mem,
                interrupt.as_ref(),
            );
        }
        let mut events = vec![EpollEvent::default(); queues.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("bulkhead-vmm: device worker epoll: {e}");
                    return;
                }
            };
            for ev in events.iter().take(n) {
                if stop.requested() {
                    return;
                }
                if let Some(q) = queues.get_mut(ev.data() as usize) {
                    let _ = q.notify.read();
                    run_queue(
                        &mut handler,
                        q.index,
                        &mut q.queue,
                        &mem,
                        interrupt.as_ref(),
                    );
                }
            }
        }
    })
}
