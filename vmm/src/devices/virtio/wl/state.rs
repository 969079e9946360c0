//! The device's state machine, independent of threads: the vfd table, command handling,
//! reading host fds into in-queue messages, and moving buffers through the two queues. The
//! worker (`device.rs`) drives it; tests drive it step by step against mock queues.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use std::time::{Duration, Instant};

use bulkhead_ipc::channel::ChannelError;
use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
use bulkhead_ipc::hub::protocol::FdInfo;
use bulkhead_ipc::MAX_FRAME;
use bulkhead_policy::{FdType, Rights};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::hub::{wait_for, HubLink, Resolved};
use super::protocol::{
    parse_command, Command, InMessage, Response, ResponseCode, VfdNew, MAX_COMMAND_SIZE,
    MAX_RECV_DATA, VFD_HOST_ID_BIT, VFD_READ, VIRTIO_WL_F_TRANS_FLAGS, VIRTIO_WL_F_USE_SHMEM,
};
use super::scm;
use super::sockets::{Connected, SocketError, WlSockets};
use super::vfd::{
    host_vfd_kind, inspect_host_fd, page_align, HostFd, HubObject, ShmWindow, Vfd, VfdKind,
};
use crate::vstate::memory::GuestMemoryMmap;

/// Per-VM limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WlLimits {
    /// Live vfds (guest and host ids together).
    pub max_vfds: usize,
    /// Bytes of shared memory mapped at once.
    pub max_shm_bytes: u64,
    /// Shared-memory vfds at once (each costs one KVM memory slot).
    pub max_shm_count: usize,
}

impl Default for WlLimits {
    fn default() -> Self {
        Self {
            max_vfds: 1024,
            max_shm_bytes: 1 << 30,
            max_shm_count: 256,
        }
    }
}

/// Everything the device knows.
pub struct WlState {
    vfds: BTreeMap<u32, Vfd>,
    window: ShmWindow,
    sockets: WlSockets,
    limits: WlLimits,
    shm_bytes: u64,
    shm_count: usize,
    next_host_id: u32,
    pending: VecDeque<InMessage>,
    features: u64,
    hub: Option<HubLink>,
    /// Objects the hub delivered: how many vfds hold each (Release when the last closes).
    hub_refs: BTreeMap<(u64, u64), usize>,
    send_wait: Duration,
}

/// How long a VFD_SEND waits for room when its peer (the hub, a host socket, a pipe) is
/// not reading, before the guest gets `RESP_OUT_OF_MEMORY` (nothing sent) or `RESP_ERR`
/// (a stream cut part-way); also how long NEW_CTX / NEW_CTX_NAMED waits for room in a
/// listening socket's full backlog before the guest gets `RESP_ERR`. The device worker is
/// never held longer than this.
pub const DEFAULT_SEND_WAIT: Duration = Duration::from_millis(500);

/// Data bytes per frame on a hub connection (a larger VFD_SEND is split; its fds go with
/// the first frame). Leaves room for the frame's header and rights list.
const HUB_CHUNK: usize = MAX_FRAME - 1024;

/// The mode of every memfd the device creates (see `memfd`): the hub's, for the same reason.
pub use bulkhead_ipc::hub::memfd_server::MEMFD_MODE;

fn memfd(size: u64) -> Result<OwnedFd, ResponseCode> {
    // SAFETY: a static NUL-terminated name; flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"bulkhead-wl".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(ResponseCode::OutOfMemory);
    }
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Mode 0644 (memfds start 0777): the hub (another uid) can still reopen it read-only to
    // attenuate, but a receiver of another uid cannot reopen it writable through
    // /proc/self/fd; the hub refuses memfds that group or others may write.
    // SAFETY: fchmod on an fd we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), MEMFD_MODE) } != 0 {
        return Err(ResponseCode::OutOfMemory);
    }
    let len = libc::off_t::try_from(size).map_err(|_| ResponseCode::OutOfMemory)?;
    // SAFETY: ftruncate on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(ResponseCode::OutOfMemory);
    }
    // Sealed against grow and shrink: a receiver's mapping can never lose pages under it,
    // and the hub only passes sealed memfds.
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, created with MFD_ALLOW_SEALING.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(ResponseCode::OutOfMemory);
    }
    Ok(fd)
}

/// Does a delivered fd become a shared-memory vfd (a memfd the VM may map)?
fn maps_shm(info: &FdInfo) -> bool {
    info.fd_type == FdType::Memfd && info.rights.contains(Rights::MAP)
}

/// The answer to a host send that did not go through: back-pressure (nothing sent) is
/// OUT_OF_MEMORY, as on hub connections, so the guest may try again; anything else is ERR.
fn send_failed(id: u32, e: &scm::SendError) -> ResponseCode {
    match e {
        scm::SendError::Full => {
            log::info!("bulkhead-vmm: virtio-wl: send on vfd {id:#x}: {e} (back-pressure)");
            ResponseCode::OutOfMemory
        }
        _ => {
            log::info!("bulkhead-vmm: virtio-wl: send on vfd {id:#x}: {e}");
            ResponseCode::Err
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ResponseCode> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ResponseCode::Err);
    }
    // SAFETY: pipe2 returned two new fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn poll_ready(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents != 0
}

impl WlState {
    /// A state with no vfds.
    pub fn new(sockets: WlSockets, window: ShmWindow, limits: WlLimits) -> Self {
        Self {
            vfds: BTreeMap::new(),
            window,
            sockets,
            limits,
            shm_bytes: 0,
            shm_count: 0,
            next_host_id: 0,
            pending: VecDeque::new(),
            features: VIRTIO_WL_F_TRANS_FLAGS,
            hub: None,
            hub_refs: BTreeMap::new(),
            send_wait: DEFAULT_SEND_WAIT,
        }
    }

    /// Resolves names the registry does not have through the hub from now on.
    pub fn set_hub(&mut self, hub: HubLink) {
        self.hub = Some(hub);
    }

    /// The hub link, if any.
    pub fn hub(&mut self) -> Option<&mut HubLink> {
        self.hub.as_mut()
    }

    /// Sets how long a send waits for room (back-pressure), on hub connections, host
    /// sockets and pipes alike.
    pub fn set_send_wait(&mut self, t: Duration) {
        self.send_wait = t;
    }

    /// The hub channel fd the worker polls (None without a hub or once it is gone).
    pub fn hub_fd(&self) -> Option<RawFd> {
        self.hub
            .as_ref()
            .and_then(|h| h.poll_fd())
            .map(|f| f.as_raw_fd())
    }

    /// Handles the hub channel's queued events (faux accepts, closes).
    pub fn read_hub(&mut self) {
        if let Some(h) = self.hub.as_mut() {
            h.poll_events();
        }
    }

    /// The host fd behind vfd `id` (what a send would pass on), for inspection.
    pub fn host_fd(&self, id: u32) -> Option<BorrowedFd<'_>> {
        self.vfds.get(&id).and_then(|v| v.fd_to_send())
    }

    /// For a shm vfd: whether the guest's mapping is writable.
    pub fn shm_writable(&self, id: u32) -> Option<bool> {
        match self.vfds.get(&id).map(|v| &v.kind) {
            Some(VfdKind::Shm(s)) => Some(s.writable),
            _ => None,
        }
    }

    /// For a vfd the hub delivered: the rights this VM holds on it.
    pub fn hub_rights(&self, id: u32) -> Option<Rights> {
        self.vfds.get(&id).and_then(|v| v.hub.map(|h| h.rights))
    }

    /// Objects received from the hub that some vfd still holds.
    pub fn hub_objects(&self) -> usize {
        self.hub_refs.len()
    }

    /// Sets the negotiated features.
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    fn trans_flags(&self) -> bool {
        self.features & VIRTIO_WL_F_TRANS_FLAGS != 0
    }

    fn use_shmem(&self) -> bool {
        self.features & VIRTIO_WL_F_USE_SHMEM != 0
    }

    /// Number of live vfds.
    pub fn vfd_count(&self) -> usize {
        self.vfds.len()
    }

    /// How many shared-memory mappings were attempted so far (each success costs an mmap
    /// and a KVM memory slot).
    pub fn shm_map_attempts(&self) -> u64 {
        self.window.map_attempts()
    }

    /// Shared memory in use: (bytes, count).
    pub fn shm_usage(&self) -> (u64, usize) {
        (self.shm_bytes, self.shm_count)
    }

    /// Messages waiting for in-queue buffers.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True while messages wait for buffers: host fds are not read (back-pressure).
    pub fn backpressured(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The shared-memory window moved to guest address `base`.
    pub fn move_window(&mut self, base: u64) {
        let live = self.vfds.values_mut().filter_map(|v| match &mut v.kind {
            VfdKind::Shm(s) => Some(s),
            _ => None,
        });
        self.window.move_to(base, live);
    }

    /// Drops every vfd and pending message (device reset).
    pub fn clear(&mut self) {
        let ids: Vec<u32> = self.vfds.keys().copied().collect();
        for id in ids {
            self.remove_vfd(id);
        }
        self.pending.clear();
        if let Some(h) = self.hub.as_mut() {
            h.reset();
        }
    }

    fn remove_vfd(&mut self, id: u32) -> bool {
        match self.vfds.remove(&id) {
            Some(v) => {
                if let VfdKind::Shm(s) = v.kind {
                    self.shm_bytes = self.shm_bytes.saturating_sub(s.size);
                    self.shm_count = self.shm_count.saturating_sub(1);
                    self.window.unmap(s);
                }
                if let Some(obj) = v.hub {
                    self.unref_hub(obj.key);
                }
                true
            }
            None => false,
        }
    }

    fn unref_hub(&mut self, key: (u64, u64)) {
        let last = match self.hub_refs.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if last {
            self.hub_refs.remove(&key);
            if let Some(h) = self.hub.as_mut() {
                h.release(key);
            }
        }
    }

    fn insert(&mut self, id: u32, vfd: Vfd) -> VfdNew {
        if let Some(obj) = &vfd.hub {
            *self.hub_refs.entry(obj.key).or_insert(0) += 1;
        }
        let d = vfd.describe(id, self.trans_flags(), &self.window, self.use_shmem());
        self.vfds.insert(id, vfd);
        d
    }

    fn check_new(&self, id: u32) -> Result<(), ResponseCode> {
        if self.vfds.contains_key(&id) {
            return Err(ResponseCode::InvalidId);
        }
        if self.vfds.len() >= self.limits.max_vfds {
            return Err(ResponseCode::OutOfMemory);
        }
        Ok(())
    }

    fn check_shm(&self, size: u64) -> Result<(), ResponseCode> {
        if self.shm_count >= self.limits.max_shm_count
            || self.shm_bytes.saturating_add(size) > self.limits.max_shm_bytes
        {
            return Err(ResponseCode::OutOfMemory);
        }
        Ok(())
    }

    /// Handles one out-queue command (the readable bytes of a chain).
    pub fn handle(&mut self, buf: &[u8]) -> Response {
        let cmd = match parse_command(buf, self.trans_flags()) {
            Ok(c) => c,
            Err(e) => return Response::Error(e),
        };
        let r = match cmd {
            Command::NewAlloc { id, size, .. } => self.new_alloc(id, size),
            Command::Close { id } => self.close(id),
            Command::Send { id, vfds, data } => self.send(id, &vfds, data),
            Command::NewCtx { id } => self.new_ctx(id, ""),
            Command::NewCtxNamed { id, name } => self.new_ctx(id, &name),
            Command::NewPipe { id, flags } => self.new_pipe(id, flags),
        };
        r.into()
    }

    fn new_alloc(&mut self, id: u32, size: u32) -> Result<Response, ResponseCode> {
        self.check_new(id)?;
        let size = page_align(u64::from(size)).ok_or(ResponseCode::OutOfMemory)?;
        self.check_shm(size)?;
        // With a hub, guest memory comes from its memfd server, charged to this VM against
        // the policy's quota; without one (or once it is gone), from a local memfd.
        let fd = match self.hub.as_mut().filter(|h| !h.is_dead()) {
            Some(hub) => hub.alloc_shm(size).map_err(|e| {
                log::info!("bulkhead-vmm: virtio-wl: VFD_NEW {id:#x} of {size} bytes: {e}");
                ResponseCode::OutOfMemory
            })?,
            None => memfd(size)?,
        };
        let shm = self.window.map(fd, size, true)?;
        self.shm_bytes += shm.size;
        self.shm_count += 1;
        Ok(Response::VfdNew(
            self.insert(id, Vfd::new(VfdKind::Shm(shm))),
        ))
    }

    fn close(&mut self, id: u32) -> Result<Response, ResponseCode> {
        if !self.remove_vfd(id) {
            return Err(ResponseCode::InvalidId);
        }
        // Data still queued for this vfd will never be read: drop it and close the host vfds
        // it was carrying.
        let mut orphans = Vec::new();
        self.pending.retain(|m| match m {
            InMessage::Recv { id: r, vfds, .. } if *r == id => {
                orphans.extend_from_slice(vfds);
                false
            }
            InMessage::Hup { id: h } => *h != id,
            _ => true,
        });
        for o in orphans {
            self.pending
                .retain(|m| !matches!(m, InMessage::VfdNew(v) if v.id == o));
            self.remove_vfd(o);
        }
        Ok(Response::Ok)
    }

    fn send(&mut self, id: u32, ids: &[u32], data: &[u8]) -> Result<Response, ResponseCode> {
        let target = self.vfds.get(&id).ok_or(ResponseCode::InvalidId)?;
        for i in ids {
            if !self.vfds.contains_key(i) {
                return Err(ResponseCode::InvalidId);
            }
        }
        if matches!(target.kind, VfdKind::Hub(_)) {
            if ids.contains(&id) {
                return Err(ResponseCode::InvalidType);
            }
            // Out of the table while it sends, so the other vfds can be borrowed.
            let mut conn = self.vfds.remove(&id).ok_or(ResponseCode::InvalidId)?;
            let r = match &mut conn.kind {
                VfdKind::Hub(h) => self.send_hub(id, h, ids, data),
                _ => Err(ResponseCode::InvalidType),
            };
            self.vfds.insert(id, conn);
            r?;
            self.sent_pipes(ids);
            return Ok(Response::Ok);
        }
        match &target.kind {
            VfdKind::Socket(sock) => {
                let mut fds = Vec::with_capacity(ids.len());
                for i in ids {
                    let fd = self
                        .vfds
                        .get(i)
                        .and_then(|v| v.fd_to_send())
                        .ok_or(ResponseCode::InvalidType)?;
                    fds.push(fd);
                }
                if let Err(e) = scm::send_all_with_fds(sock.as_fd(), data, &fds, self.send_wait) {
                    return Err(send_failed(id, &e));
                }
            }
            VfdKind::Pipe {
                local,
                guest_reads: false,
                ..
            } => {
                if !ids.is_empty() {
                    return Err(ResponseCode::InvalidType);
                }
                if let Err(e) = scm::write_all_bounded(local.as_fd(), data, self.send_wait) {
                    return Err(send_failed(id, &e));
                }
            }
            _ => return Err(ResponseCode::InvalidType),
        }
        self.sent_pipes(ids);
        Ok(Response::Ok)
    }

    /// One VFD_SEND on a hub connection: one frame (more if the data exceeds a frame; the
    /// fds go with the first), each fd with the rights its vfd holds. Back-pressure
    /// (`WouldBlock`) waits at most `send_wait` for room, then answers OUT_OF_MEMORY.
    fn send_hub(
        &self,
        id: u32,
        conn: &mut HubConn,
        ids: &[u32],
        data: &[u8],
    ) -> Result<(), ResponseCode> {
        let mut fds = Vec::with_capacity(ids.len());
        for i in ids {
            let v = self.vfds.get(i).ok_or(ResponseCode::InvalidId)?;
            let fd = v.fd_to_send().ok_or(ResponseCode::InvalidType)?;
            fds.push((fd, v.rights_to_send()));
        }
        if data.is_empty() && fds.is_empty() {
            return Ok(()); // nothing to carry (a zero-length stream write)
        }
        let mut chunks: Vec<&[u8]> = data.chunks(HUB_CHUNK).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (n, chunk) in chunks.into_iter().enumerate() {
            let these: &[(BorrowedFd<'_>, Rights)] = if n == 0 { &fds } else { &[] };
            let deadline = Instant::now() + self.send_wait;
            loop {
                match conn.try_send(chunk, these) {
                    Ok(_) => break,
                    Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            log::info!(
                                "bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: the peer is not reading (back-pressure)"
                            );
                            return Err(ResponseCode::OutOfMemory);
                        }
                        wait_for(conn.as_fd(), libc::POLLOUT, left);
                    }
                    Err(e) => {
                        log::debug!("bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: {e}");
                        return Err(ResponseCode::Err);
                    }
                }
            }
        }
        Ok(())
    }

    fn sent_pipes(&mut self, ids: &[u32]) {
        // The remote ends of sent pipes now live with the peer: drop ours so EOF propagates.
        for i in ids {
            if let Some(Vfd {
                kind: VfdKind::Pipe { remote, .. },
                ..
            }) = self.vfds.get_mut(i)
            {
                *remote = None;
            }
        }
    }

    /// NEW_CTX / NEW_CTX_NAMED: a name in the local registry wins (a listening socket is
    /// connected to within `send_wait`); otherwise, with a hub, `listen:<svc>` provides and
    /// anything else connects through it. Every failure is the same `RESP_ERR` as an unknown
    /// name.
    fn new_ctx(&mut self, id: u32, name: &str) -> Result<Response, ResponseCode> {
        self.check_new(id)?;
        let kind = match self.sockets.take(name, self.send_wait) {
            Ok(Connected::Stream(s)) => VfdKind::Socket(s),
            Ok(Connected::Hub(h)) => VfdKind::Hub(h),
            Err(SocketError::NotFound(_)) if self.hub.is_some() => {
                let hub = self.hub.as_mut().ok_or(ResponseCode::Err)?;
                match hub.resolve(name) {
                    Ok(Resolved::Listener(s)) => VfdKind::Socket(s),
                    Ok(Resolved::Conn(h)) => VfdKind::Hub(h),
                    Err(e) => {
                        log::info!("bulkhead-vmm: virtio-wl: {name:?}: {e}");
                        return Err(ResponseCode::Err);
                    }
                }
            }
            Err(e) => {
                match &e {
                    SocketError::NotFound(_) => log::debug!("bulkhead-vmm: virtio-wl: {e}"),
                    _ => log::warn!("bulkhead-vmm: virtio-wl: {e}"),
                }
                return Err(ResponseCode::Err);
            }
        };
        Ok(Response::VfdNew(self.insert(id, Vfd::new(kind))))
    }

    fn new_pipe(&mut self, id: u32, flags: u32) -> Result<Response, ResponseCode> {
        self.check_new(id)?;
        let (read_end, write_end) = pipe()?;
        let guest_reads = flags == VFD_READ;
        let (local, remote) = if guest_reads {
            (read_end, write_end)
        } else {
            (write_end, read_end)
        };
        self.insert(
            id,
            Vfd::new(VfdKind::Pipe {
                local,
                remote: Some(remote),
                guest_reads,
            }),
        );
        Ok(Response::VfdNew(VfdNew {
            id,
            flags: 0,
            pfn: 0,
            size: 0,
        }))
    }

    fn alloc_host_id(&mut self) -> Option<u32> {
        for _ in 0..=VFD_HOST_ID_BIT {
            let id = VFD_HOST_ID_BIT | (self.next_host_id & (VFD_HOST_ID_BIT - 1));
            self.next_host_id = self.next_host_id.wrapping_add(1);
            if !self.vfds.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// The (vfd id, fd) pairs the worker polls for input (none while back-pressured).
    pub fn watched_fds(&self) -> Vec<(u32, RawFd)> {
        if self.backpressured() {
            return Vec::new();
        }
        self.vfds
            .iter()
            .filter_map(|(id, v)| v.readable_fd().map(|fd| (*id, fd.as_raw_fd())))
            .collect()
    }

    /// Reads every host fd that has input now, without blocking. Returns the messages queued.
    pub fn read_host(&mut self) -> usize {
        let before = self.pending.len();
        let ready: Vec<u32> = self
            .vfds
            .iter()
            .filter_map(|(id, v)| v.readable_fd().filter(|fd| poll_ready(*fd)).map(|_| *id))
            .collect();
        for id in ready {
            self.read_vfd(id);
        }
        self.pending.len() - before
    }

    /// Reads one chunk (at most one in-queue buffer's worth) from vfd `id`'s host fd.
    pub fn read_vfd(&mut self, id: u32) {
        if matches!(self.vfds.get(&id).map(|v| &v.kind), Some(VfdKind::Hub(_))) {
            self.read_hub_vfd(id);
            return;
        }
        let mut buf = vec![0u8; MAX_RECV_DATA];
        let (len, fds) = {
            let Some(v) = self.vfds.get(&id) else { return };
            match &v.kind {
                VfdKind::Socket(s) => match scm::recv_with_fds(s.as_fd(), &mut buf) {
                    Ok(r) => {
                        if r.truncated {
                            log::warn!(
                                "bulkhead-vmm: virtio-wl: more than 28 fds; extra ones dropped"
                            );
                        }
                        (r.len, r.fds)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(_) => (0, Vec::new()),
                },
                VfdKind::Pipe {
                    local,
                    guest_reads: true,
                    ..
                } => match scm::read_pipe_now(local.as_fd(), &mut buf) {
                    Ok(n) => (n, Vec::new()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        return
                    }
                    Err(_) => (0, Vec::new()),
                },
                _ => return,
            }
        };
        if len == 0 && fds.is_empty() {
            if let Some(v) = self.vfds.get_mut(&id) {
                v.hung_up = true;
            }
            self.pending.push_back(InMessage::Hup { id });
            return;
        }
        let mut ids = Vec::with_capacity(fds.len());
        for fd in fds {
            if self.vfds.len() >= self.limits.max_vfds {
                log::warn!("bulkhead-vmm: virtio-wl: vfd limit reached; a received fd was dropped");
                continue;
            }
            let Some(hid) = self.alloc_host_id() else {
                continue;
            };
            // Limits first: a buffer over them is never mapped (no mmap, no KVM slot).
            let what = match inspect_host_fd(fd.as_fd()) {
                Ok(w) => w,
                Err(e) => {
                    log::warn!("bulkhead-vmm: virtio-wl: received fd not usable ({e}); closed");
                    continue;
                }
            };
            if let HostFd::Shm { size, .. } = what {
                if self.check_shm(size).is_err() {
                    log::warn!(
                        "bulkhead-vmm: virtio-wl: shm limit reached; a received buffer of {size} bytes was dropped"
                    );
                    continue;
                }
            }
            let kind = match host_vfd_kind(fd, what, &mut self.window) {
                Ok(k) => k,
                Err(e) => {
                    log::warn!("bulkhead-vmm: virtio-wl: received fd not usable: {e:?}");
                    continue;
                }
            };
            if let VfdKind::Shm(s) = &kind {
                self.shm_bytes += s.size;
                self.shm_count += 1;
            }
            let d = self.insert(hid, Vfd::new(kind));
            self.pending.push_back(InMessage::VfdNew(d));
            ids.push(hid);
        }
        buf.truncate(len);
        self.pending.push_back(InMessage::Recv {
            id,
            vfds: ids,
            data: buf,
        });
    }

    /// Reads one frame from a hub connection vfd: every fd becomes a host vfd typed by the
    /// hub's `FdInfo` (VFD_NEW each), then the data as VFD_RECV (split at `MAX_RECV_DATA`,
    /// the vfds with the first part). EOF is VFD_HUP; a refused frame is only logged.
    fn read_hub_vfd(&mut self, id: u32) {
        let got = match self.vfds.get(&id).map(|v| &v.kind) {
            Some(VfdKind::Hub(h)) => h.try_recv(),
            _ => return,
        };
        let (data, fds) = match got {
            Ok(Incoming::Message { data, fds }) => (data, fds),
            Ok(Incoming::Refused { seq, error }) => {
                log::info!(
                    "bulkhead-vmm: virtio-wl: the hub refused frame {seq} sent on vfd {id:#x}: {error:?} (dropped whole)"
                );
                return;
            }
            Err(ClientError::Channel(ChannelError::WouldBlock)) => return,
            Err(ClientError::Channel(ChannelError::Closed | ChannelError::Sys { .. })) => {
                if let Some(v) = self.vfds.get_mut(&id) {
                    v.hung_up = true;
                }
                self.pending.push_back(InMessage::Hup { id });
                return;
            }
            Err(e) => {
                log::warn!("bulkhead-vmm: virtio-wl: bad frame on hub vfd {id:#x}: {e}");
                return;
            }
        };
        if data.is_empty() && fds.is_empty() {
            // An empty RECV would read as end-of-stream in the guest: nothing to deliver.
            return;
        }
        let Some(ids) = self.insert_hub_fds(id, fds) else {
            return;
        };
        let mut chunks = data.chunks(MAX_RECV_DATA);
        let first = chunks.next().unwrap_or_default();
        self.pending.push_back(InMessage::Recv {
            id,
            vfds: ids,
            data: first.to_vec(),
        });
        for c in chunks {
            self.pending.push_back(InMessage::Recv {
                id,
                vfds: Vec::new(),
                data: c.to_vec(),
            });
        }
    }

    /// The fds of one hub frame become host vfds all together or not at all: the limits
    /// (vfds, shm count and bytes) are checked for the whole frame first; if it does not
    /// fit, or a vfd cannot be made after all (fstat, mmap, no host id), the message is
    /// dropped whole (logged; the guest never sees part of it, and the vfds made so far are
    /// taken back), and every object of it that no other vfd holds is released to the hub,
    /// so the hub's accounting of this VM stays right.
    fn insert_hub_fds(&mut self, id: u32, fds: Vec<(OwnedFd, FdInfo)>) -> Option<Vec<u32>> {
        let mut prepared = Vec::with_capacity(fds.len());
        let mut keys = Vec::with_capacity(fds.len());
        let mut failed = None;
        for (fd, info) in fds {
            // SAFETY: fstat on an fd we own, into a zeroed stat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
                failed = Some("fstat of a received fd failed".to_string());
                continue;
            }
            let key = (st.st_dev, st.st_ino);
            let size = page_align(u64::try_from(st.st_size).unwrap_or(0)).unwrap_or(0);
            keys.push(key);
            prepared.push((fd, info, key, size));
        }
        let n = prepared.len();
        let (shm_count, shm_bytes) = prepared
            .iter()
            .filter(|(_, info, _, _)| maps_shm(info))
            .fold((0usize, 0u64), |(c, b), (_, _, _, size)| {
                (c + 1, b.saturating_add(*size))
            });
        if failed.is_none() {
            if self.vfds.len().saturating_add(n) > self.limits.max_vfds {
                failed = Some(format!(
                    "{n} vfds do not fit ({} of {} in use)",
                    self.vfds.len(),
                    self.limits.max_vfds
                ));
            } else if self.shm_count.saturating_add(shm_count) > self.limits.max_shm_count
                || self.shm_bytes.saturating_add(shm_bytes) > self.limits.max_shm_bytes
            {
                failed = Some(format!(
                    "{shm_count} buffers of {shm_bytes} bytes do not fit the shm limits"
                ));
            }
        }
        let mut ids = Vec::with_capacity(n);
        let mut inserted = Vec::with_capacity(n);
        if failed.is_none() {
            for (fd, info, key, size) in prepared {
                match self.insert_hub_fd(fd, info, key, size) {
                    Ok(hid) => {
                        ids.push(hid);
                        inserted.push(key);
                    }
                    Err(why) => {
                        failed = Some(why.to_string());
                        break;
                    }
                }
            }
        }
        let Some(why) = failed else {
            return Some(ids);
        };
        log::warn!(
            "bulkhead-vmm: virtio-wl: a hub message on vfd {id:#x} with {} fds dropped whole: {why}",
            keys.len()
        );
        // Take back what was made (its VFD_NEW never reaches the guest; removing the last vfd
        // of an object releases it), then release the rest that no vfd holds.
        self.pending
            .retain(|m| !matches!(m, InMessage::VfdNew(v) if ids.contains(&v.id)));
        for hid in ids {
            self.remove_vfd(hid);
        }
        for key in keys {
            if !inserted.contains(&key) && !self.hub_refs.contains_key(&key) {
                if let Some(h) = self.hub.as_mut() {
                    h.release(key);
                }
            }
        }
        None
    }

    /// A host vfd for an fd the hub delivered (limits already checked for its frame), typed
    /// and limited by `info` (never by the device's own guess): a memfd is mapped read-only
    /// unless WRITE, and not at all without MAP; a pipe end's direction comes from
    /// `write_end`. Queues its VFD_NEW.
    fn insert_hub_fd(
        &mut self,
        fd: OwnedFd,
        info: FdInfo,
        key: (u64, u64),
        size: u64,
    ) -> Result<u32, &'static str> {
        let hid = self.alloc_host_id().ok_or("no free host vfd id")?;
        let kind = match info.fd_type {
            FdType::Memfd if maps_shm(&info) => {
                let writable = info.rights.contains(Rights::WRITE);
                let s = self
                    .window
                    .map(fd, size, writable)
                    .map_err(|_| "cannot map a received memfd")?;
                self.shm_bytes += s.size;
                self.shm_count += 1;
                VfdKind::Shm(s)
            }
            FdType::Pipe => VfdKind::Pipe {
                local: fd,
                remote: None,
                guest_reads: !info.write_end,
            },
            FdType::Socket => VfdKind::Socket(std::os::unix::net::UnixStream::from(fd)),
            FdType::Memfd | FdType::Dmabuf | FdType::Fence => VfdKind::Opaque(fd),
        };
        let mut vfd = Vfd::new(kind);
        vfd.hub = Some(HubObject {
            key,
            rights: info.rights,
        });
        let d = self.insert(hid, vfd);
        self.pending.push_back(InMessage::VfdNew(d));
        Ok(hid)
    }

    /// Moves pending messages into the buffers the guest posted on the in queue. Returns true
    /// if buffers were used.
    pub fn process_in(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(msg) = self.pending.front() {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::warn!("bulkhead-vmm: virtio-wl: bad in queue: {e:?}");
                    return used;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let bytes = msg.encode();
            let mut written = 0usize;
            for desc in chain.writable() {
                let Some(part) = bytes.get(written..) else {
                    break;
                };
                if part.is_empty() {
                    break;
                }
                let n = part.len().min(desc.len() as usize);
                let Some(part) = part.get(..n) else { break };
                if mem.write_slice(part, GuestAddress(desc.addr().0)).is_err() {
                    break;
                }
                written += n;
            }
            if written < bytes.len() {
                log::warn!(
                    "bulkhead-vmm: virtio-wl: in-queue buffer too small ({written} < {}); message cut",
                    bytes.len()
                );
            }
            self.pending.pop_front();
            if queue.add_used(mem, head, written as u32).is_err() {
                return used;
            }
            used = true;
        }
        used
    }

    /// Handles every command on the out queue. Returns true if buffers were used.
    pub fn process_out(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    log::warn!("bulkhead-vmm: virtio-wl: bad out queue: {e:?}");
                    return used;
                }
            };
            let Some(chain) = chain else { return used };
            let head = chain.head_index();
            let mut request = Vec::new();
            let mut writable = Vec::new();
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() {
                    writable.push((desc.addr().0, desc.len() as usize));
                    continue;
                }
                let len = desc.len() as usize;
                if request.len() + len > MAX_COMMAND_SIZE {
                    bad = true;
                    continue;
                }
                let start = request.len();
                request.resize(start + len, 0);
                let Some(dst) = request.get_mut(start..) else {
                    bad = true;
                    continue;
                };
                if mem.read_slice(dst, GuestAddress(desc.addr().0)).is_err() {
                    bad = true;
                }
            }
            let resp = if bad {
                Response::Error(ResponseCode::InvalidCmd)
            } else {
                self.handle(&request)
            };
            let bytes = resp.encode();
            let mut written = 0usize;
            for (addr, len) in writable {
                let Some(part) = bytes.get(written..) else {
                    break;
                };
                if part.is_empty() {
                    break;
                }
                let n = part.len().min(len);
                let Some(part) = part.get(..n) else { break };
                if mem.write_slice(part, GuestAddress(addr)).is_err() {
                    break;
                }
                written += n;
            }
            if queue.add_used(mem, head, written as u32).is_err() {
                return used;
            }
            used = true;
        }
    }
}
