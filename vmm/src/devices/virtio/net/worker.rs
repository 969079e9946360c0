//! The data thread of an activated device: guest TX chains into the TX ring, RX ring
//! records into the guest's buffers, doorbells both ways. It waits (epoll) on the queues'
//! notifications, the link's connection (doorbells from the net VM, its hang-up), a new
//! link, and its stop event; it holds the link's lock only while it works.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use bulkhead_netring::RingError;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::link::{lock, Shared};
use super::queues::{serve_rx, serve_tx};
use super::rx::RxBuffers;
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{Activation, VirtioInterrupt};
use crate::vstate::memory::GuestMemoryMmap;

const STOP: u64 = 0;
const RX_NOTIFY: u64 = 1;
const TX_NOTIFY: u64 = 2;
const LINK_CHANGED: u64 = 3;
const CONN: u64 = 4;
/// How soon a doorbell that could not go out is tried again.
const KICK_RETRY_MS: i32 = 5;

/// The running data thread; dropping it stops and joins it.
pub struct NetWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl NetWorker {
    /// Starts serving `activation`'s queues.
    pub fn spawn(shared: Arc<Shared>, activation: Activation) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_t = stop.try_clone()?;
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(stop.as_raw_fd(), STOP)?;
        add(shared.link_changed.as_raw_fd(), LINK_CHANGED)?;
        for q in &activation.queues {
            let token = if q.index == RX_QUEUE {
                RX_NOTIFY
            } else {
                TX_NOTIFY
            };
            add(q.notify.as_raw_fd(), token)?;
        }
        let thread = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || {
                // Started by a vCPU (the guest's DRIVER_OK): the worker filter first.
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
                let _stop = stop_t; // registered in `epoll`: kept open while it runs
                run(&shared, activation, &epoll)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

struct Queues<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Option<&'a mut Queue>,
    tx: Option<&'a mut Queue>,
    interrupt: &'a dyn VirtioInterrupt,
    features: u64,
}

/// One pass: returns whether a doorbell waits to be retried, or the ring broke.
fn pass(
    shared: &Shared,
    qs: &mut Queues<'_>,
    rxbufs: &mut RxBuffers,
) -> Result<bool, (u64, String)> {
    let stats = &shared.stats;
    let mut guard = lock(&shared.link);
    let Some(link) = guard.as_mut() else {
        // Link down: the guest's frames go nowhere; they are returned, not kept.
        if let Some(tx) = qs.tx.as_deref_mut() {
            if let Ok(served) = serve_tx(tx, qs.mem, None, qs.features, stats) {
                if served.interrupt {
                    qs.interrupt.notify_queue(TX_QUEUE);
                }
            }
        }
        return Ok(false);
    };
    let generation = link.generation;
    let broken = |e: RingError| (generation, format!("broke the ring: {e}"));
    if !link.drain(stats) {
        return Err((generation, "closed the connection".into()));
    }
    let mut kick = false;
    if let Some(tx) = qs.tx.as_deref_mut() {
        let served =
            serve_tx(tx, qs.mem, Some(&mut link.tx), qs.features, stats).map_err(broken)?;
        if served.interrupt {
            qs.interrupt.notify_queue(TX_QUEUE);
        }
        kick |= link.tx.kick_needed().map_err(broken)?;
    }
    if let Some(rx) = qs.rx.as_deref_mut() {
        let served =
            serve_rx(rx, qs.mem, &mut link.rx, rxbufs, qs.features, stats).map_err(broken)?;
        if served.interrupt {
            qs.interrupt.notify_queue(RX_QUEUE);
        }
        kick |= link.rx.space_kick_needed().map_err(broken)?;
    }
    if (kick || link.kick_pending) && !link.kick(stats) {
        return Err((generation, "closed the connection".into()));
    }
    Ok(link.kick_pending)
}

fn run(shared: &Shared, activation: Activation, epoll: &Epoll) {
    let Activation {
        mem,
        mut queues,
        interrupt,
        features,
    } = activation;
    let mut rx = None;
    let mut tx = None;
    let mut notifies = Vec::new();
    for q in queues.iter_mut() {
        if let Ok(e) = q.notify.try_clone() {
            notifies.push(e);
        }
        if q.index == RX_QUEUE {
            rx = Some(&mut q.queue);
        } else if q.index == TX_QUEUE {
            tx = Some(&mut q.queue);
        }
    }
    let mut qs = Queues {
        mem: &mem,
        rx,
        tx,
        interrupt: interrupt.as_ref(),
        features,
    };
    let mut rxbufs = RxBuffers::default();
    let mut watched: Option<(u64, OwnedFd)> = None;
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        // Watch the live link's connection (a dup, so the fd number cannot be reused under
        // epoll when the link goes).
        let live = lock(&shared.link)
            .as_ref()
            .map(|l| (l.generation, l.conn.as_fd().try_clone_to_owned()));
        if live.as_ref().map(|(g, _)| *g) != watched.as_ref().map(|(g, _)| *g) {
            if let Some((_, fd)) = watched.take() {
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    fd.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            if let Some((g, Ok(fd))) = live {
                if epoll
                    .ctl(
                        ControlOperation::Add,
                        fd.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, CONN),
                    )
                    .is_ok()
                {
                    watched = Some((g, fd));
                }
            }
        }
        let timeout = match pass(shared, &mut qs, &mut rxbufs) {
            Ok(true) => KICK_RETRY_MS,
            Ok(false) => -1,
            Err((generation, why)) => {
                shared.take_down(Some(generation), &why);
                0
            }
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("bulkhead-vmm: virtio-net worker: epoll: {e}");
                return;
            }
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                STOP => return,
                LINK_CHANGED => {
                    let _ = shared.link_changed.read();
                }
                _ => {}
            }
        }
        for e in &notifies {
            let _ = e.read();
        }
    }
}
