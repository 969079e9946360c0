//! The backend link: a hub connection to `net@<vm>` (the net VM's `bulkhead-netd`) and the
//! ring memfd shared over it. A thread made at VMM start connects through the VM's hub
//! channel, allocates the ring from the hub's memfd server, maps it, lays it out and sends
//! it (the hello) to the net VM; the link is then up. When the connection closes (the net
//! VM stopped or restarted, the hub dropped it) or the net VM breaks the ring, the link goes
//! down and the thread connects again, with a growing pause (0.1 s to 2 s), until it works.
//! A VM without the grant therefore never gets a link, and the hub's audit log names the
//! missing grant on each try (coalesced).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_ipc::hub::client::{HubConn, Incoming};
use bulkhead_ipc::hub::protocol::Refusal;
use bulkhead_netring::{
    create, ring_len, set_features, Consumer, Hello, Mapping, Producer, Side, DEFAULT_DATA_SIZE,
    KICK,
};
use bulkhead_policy::Rights;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::stats::{add, NetStats};
use crate::devices::virtio::VirtioInterrupt;

/// How the device reaches the hub: a connection to a service and shared memory from the
/// memfd server, both charged to this VM under the policy.
pub trait HubAccess: Send + 'static {
    /// Connects to `service@provider` (`PermissionDenied` and friends come back as text).
    fn connect(&mut self, name: &str) -> Result<HubConn, String>;
    /// A sealed memfd of at least `size` bytes from the hub's memfd server.
    fn alloc_shm(&mut self, size: u64) -> Result<OwnedFd, String>;
}

/// The live connection and its ring.
pub struct Link {
    /// The hub connection (doorbells; its EOF is the link going down).
    pub conn: HubConn,
    /// The guest → net VM ring.
    pub tx: Producer,
    /// The net VM → guest ring.
    pub rx: Consumer,
    /// A doorbell that could not go out yet (socket full, or refused `Busy`).
    pub kick_pending: bool,
    map: Mapping,
    /// Which connection this is (counts up).
    pub generation: u64,
}

impl Link {
    /// Publishes the features the guest negotiated (offloads) for the net VM.
    pub fn set_features(&self, features: u64) {
        if let Err(e) = set_features(self.map.mem(), features) {
            log::warn!("bulkhead-vmm: virtio-net: {e}");
        }
    }

    /// Sends a doorbell, or remembers to. Returns false if the connection is gone.
    pub fn kick(&mut self, stats: &NetStats) -> bool {
        match self.conn.try_send(KICK, &[]) {
            Ok(_) => {
                self.kick_pending = false;
                add(&stats.kicks_sent, 1);
                true
            }
            Err(bulkhead_ipc::hub::client::ClientError::Channel(
                bulkhead_ipc::channel::ChannelError::WouldBlock,
            )) => {
                self.kick_pending = true;
                true
            }
            Err(e) => {
                log::info!("bulkhead-vmm: virtio-net: doorbell: {e}");
                false
            }
        }
    }

    /// Reads what the hub sent (doorbells, verdicts on ours, `Ready`). Returns false when
    /// the connection closed.
    pub fn drain(&mut self, stats: &NetStats) -> bool {
        loop {
            match self.conn.try_recv() {
                Ok(Incoming::Message { .. }) => add(&stats.kicks_received, 1),
                Ok(Incoming::Accepted { .. }) => {}
                Ok(Incoming::Refused {
                    error: Refusal::Busy,
                    ..
                }) => self.kick_pending = true,
                Ok(Incoming::Refused { error, .. }) => {
                    log::warn!("bulkhead-vmm: virtio-net: the hub refused a doorbell: {error:?}");
                    return false;
                }
                Ok(Incoming::Ready) => {
                    if self.kick_pending && !self.kick(stats) {
                        return false;
                    }
                }
                Err(bulkhead_ipc::hub::client::ClientError::Channel(
                    bulkhead_ipc::channel::ChannelError::WouldBlock,
                )) => return true,
                Err(e) => {
                    log::info!("bulkhead-vmm: virtio-net: connection: {e}");
                    return false;
                }
            }
        }
    }
}

/// What the device's threads share.
pub struct Shared {
    /// The link, when up.
    pub link: Mutex<Option<Link>>,
    /// `VIRTIO_NET_S_LINK_UP` as the config space shows it.
    pub up: AtomicBool,
    /// The features the guest's driver accepted (0 while the device is not active).
    pub features: AtomicU64,
    /// Interrupts, while the device is active (config changes on link changes).
    pub interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    /// Written when a new link is installed (wakes the data worker).
    pub link_changed: EventFd,
    /// Written when the data worker saw the link break (wakes the link thread).
    pub link_lost: EventFd,
    /// Counters.
    pub stats: NetStats,
    /// The service, for logs (`net@net-vm`).
    pub service: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

/// Locks a mutex, surviving a poisoned one (a thread that panicked left plain data).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// New shared state for the device.
    pub fn new(service: &str, mac: [u8; 6]) -> std::io::Result<Self> {
        Ok(Self {
            link: Mutex::new(None),
            up: AtomicBool::new(false),
            features: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            link_changed: EventFd::new(EFD_NONBLOCK)?,
            link_lost: EventFd::new(EFD_NONBLOCK)?,
            stats: NetStats::default(),
            service: service.to_string(),
            mac,
        })
    }

    fn notify_config(&self) {
        if let Some(i) = lock(&self.interrupt).as_ref() {
            i.notify_config();
        }
    }

    /// Takes the link down (if `generation` is still the live one, or any with `None`):
    /// the guest sees the carrier go, the ring is unmapped, the connection closed.
    pub fn take_down(&self, generation: Option<u64>, why: &str) {
        let old = {
            let mut l = lock(&self.link);
            match (l.as_ref(), generation) {
                (Some(link), Some(g)) if link.generation != g => None,
                _ => l.take(),
            }
        };
        if old.is_some() {
            self.up.store(false, Ordering::SeqCst);
            add(&self.stats.link_downs, 1);
            log::info!(
                "bulkhead-vmm: virtio-net: link down ({} {why}); {}",
                self.service,
                self.stats.summary()
            );
            self.notify_config();
            let _ = self.link_lost.write(1);
        }
    }

    fn install(&self, link: Link) {
        link.set_features(self.features.load(Ordering::SeqCst));
        *lock(&self.link) = Some(link);
        self.up.store(true, Ordering::SeqCst);
        add(&self.stats.link_ups, 1);
        self.notify_config();
        let _ = self.link_changed.write(1);
    }
}

/// How long a hello waits for the hub's verdict (the net VM's guest must take the
/// connection first; under nested emulation with several guests booting that takes seconds).
const HELLO_VERDICT_WAIT: Duration = Duration::from_secs(30);
/// Pauses between connection attempts.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Makes one link: connect, allocate and lay out the ring, send the hello.
pub fn connect_once(
    hub: &mut dyn HubAccess,
    service: &str,
    mac: [u8; 6],
    generation: u64,
) -> Result<Link, String> {
    let mut conn = hub.connect(service)?;
    let len = ring_len(DEFAULT_DATA_SIZE);
    let memfd = hub.alloc_shm(len as u64)?;
    let map = Mapping::map(memfd.as_fd(), len).map_err(|e| e.to_string())?;
    let info = create(map.mem(), DEFAULT_DATA_SIZE, mac).map_err(|e| e.to_string())?;
    let hello = Hello {
        ring_len: len as u64,
    };
    let rights = Rights::READ | Rights::WRITE | Rights::MAP;
    let mut sending = conn
        .begin(bulkhead_netring::HELLO_LEN)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + HELLO_VERDICT_WAIT;
    loop {
        match conn.send_next(&mut sending, &hello.encode(), &[(memfd.as_fd(), rights)]) {
            Ok(()) => break,
            Err(bulkhead_ipc::hub::client::ClientError::Channel(
                bulkhead_ipc::channel::ChannelError::WouldBlock,
            )) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("hello: {e}")),
        }
    }
    drop(memfd); // the mapping holds the memfd (and the memfd server's charge) from now on
    let mut ready = false;
    loop {
        match conn.take_verdict(&sending, &mut ready) {
            Ok(Some(Ok(()))) => break,
            Ok(Some(Err(e))) => return Err(format!("the hub refused the ring: {e:?}")),
            Ok(None) if Instant::now() < deadline => {
                crate::devices::virtio::wl::hub::wait_for(
                    conn.as_fd(),
                    libc::POLLIN,
                    deadline.saturating_duration_since(Instant::now()),
                );
            }
            Ok(None) => return Err("no verdict on the ring from the hub".into()),
            Err(e) => return Err(format!("hello: {e}")),
        }
    }
    let mem = map.mem();
    Ok(Link {
        conn,
        tx: Producer::new(mem, &info, Side::Tx),
        rx: Consumer::new(mem, &info, Side::Rx),
        kick_pending: false,
        map,
        generation,
    })
}

/// The thread that keeps the link up; dropping it stops and joins it.
pub struct LinkThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl LinkThread {
    /// Starts connecting `shared.service` through `hub`.
    pub fn spawn(shared: Arc<Shared>, mut hub: Box<dyn HubAccess>) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_t = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("virtio-net-link".into())
            .spawn(move || {
                // Started by main before main's own filter: a worker's filter first (its
                // calls: the hub channel and connection, poll, eventfds, the ring's mmap).
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
                run(&shared, hub.as_mut(), &stop_t)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LinkThread {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

/// Waits on `fds` (with their events) for up to `timeout` (None: forever); returns the
/// revents, or None on error.
fn poll(fds: &[(i32, i16)], timeout: Option<Duration>) -> Option<Vec<i16>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, ev)| libc::pollfd {
            fd: *fd,
            events: *ev,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `p` is a valid pollfd array for the duration of the call; the fds are owned
    // by the caller and stay open across it.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
        return None;
    }
    Some(p.iter().map(|x| x.revents).collect())
}

fn run(shared: &Shared, hub: &mut dyn HubAccess, stop: &EventFd) {
    let mut generation = 0u64;
    let mut pause = FIRST_RETRY;
    let mut failures = 0u64;
    let mut last_error = String::new();
    loop {
        generation += 1;
        match connect_once(hub, &shared.service, shared.mac, generation) {
            Ok(link) => {
                // A dup of the connection, polled only for its hang-up.
                let watch: Option<OwnedFd> = link.conn.as_fd().try_clone_to_owned().ok();
                log::info!(
                    "bulkhead-vmm: virtio-net: link up ({}, {} KiB rings{})",
                    shared.service,
                    DEFAULT_DATA_SIZE / 1024,
                    if failures > 0 {
                        format!(", after {failures} failed attempts")
                    } else {
                        String::new()
                    }
                );
                failures = 0;
                last_error.clear();
                pause = FIRST_RETRY;
                shared.install(link);
                let _ = shared.link_lost.read();
                loop {
                    let watch_fd = watch.as_ref().map_or(-1, |f| f.as_raw_fd());
                    let Some(rev) = poll(
                        &[
                            (stop.as_raw_fd(), libc::POLLIN),
                            (shared.link_lost.as_raw_fd(), libc::POLLIN),
                            (watch_fd, 0),
                        ],
                        None,
                    ) else {
                        return;
                    };
                    if rev.first().is_some_and(|r| *r != 0) {
                        return;
                    }
                    if rev.get(1).is_some_and(|r| *r != 0) {
                        let _ = shared.link_lost.read();
                    }
                    if rev
                        .get(2)
                        .is_some_and(|r| *r & (libc::POLLHUP | libc::POLLERR) != 0)
                    {
                        shared.take_down(Some(generation), "closed the connection");
                    }
                    let live = lock(&shared.link)
                        .as_ref()
                        .is_some_and(|l| l.generation == generation);
                    if !live {
                        break;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                // Each new reason once at info (a refusal before net-vm provides `net`, then
                // perhaps another), repeats at debug.
                if e != last_error {
                    log::info!(
                        "bulkhead-vmm: virtio-net: no link to {}: {e}; trying again",
                        shared.service
                    );
                    last_error = e;
                } else {
                    log::debug!("bulkhead-vmm: virtio-net: {}: {e}", shared.service);
                }
            }
        }
        match poll(&[(stop.as_raw_fd(), libc::POLLIN)], Some(pause)) {
            Some(r) if r.first().is_some_and(|r| *r != 0) => return,
            None => return,
            _ => {}
        }
        pause = (pause * 2).min(MAX_RETRY);
    }
}
