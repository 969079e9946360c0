//! The worker thread of an activated virtio device: waits on its queues' notification
//! eventfds and a stop eventfd, lets the device's `QueueHandler` process the queue, and raises
//! the queue interrupt when buffers were used.

use std::os::fd::AsRawFd;
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

/// A running worker; stopping (or dropping) it joins the thread.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
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

impl Worker {
    /// Starts a thread named `name` serving `activation`'s queues with `handler`.
    pub fn spawn<H: QueueHandler>(
        name: &str,
        mut handler: H,
        activation: Activation,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (slot, q) in activation.queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.notify.as_raw_fd(),
                EpollEvent::new(EventSet::IN, slot as u64),
            )?;
        }
        let stop_clone = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
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
                        let token = ev.data();
                        if token == STOP_TOKEN {
                            return;
                        }
                        if let Some(q) = queues.get_mut(token as usize) {
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
            })?;
        Ok(Self {
            stop: stop_clone,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
