//! Out-queue commands: VFD_NEW (shared memory), NEW_CTX / NEW_CTX_NAMED (sockets, hub
//! names), NEW_PIPE, SEND (host sockets, pipes, hub connections) and CLOSE, each answered
//! with one `Response`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use bulkhead_ipc::channel::ChannelError;
use bulkhead_ipc::hub::client::{ClientError, HubConn};
use bulkhead_ipc::hub::protocol::Refusal;

use super::hub::{wait_for, Resolved};
use super::protocol::{parse_command, Command, InMessage, Response, ResponseCode, VFD_READ};
use super::scm;
use super::sockets::{Connected, SocketError};
use super::state::WlState;
use super::vfd::{page_align, Vfd, VfdKind};

/// How long a SEND on a hub connection waits for the hub's verdict once all of it went
/// out. The hub decides each send as it reads it, so this bound is reached only if the hub
/// is stuck; the guest then gets ERR (the outcome is unknown; logged).
pub const VERDICT_WAIT: Duration = Duration::from_secs(10);

/// After a `Busy` verdict without `Ready`, how long to wait before trying again (within
/// the send wait).
const BUSY_RETRY: Duration = Duration::from_millis(20);

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

impl WlState {
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

    /// One VFD_SEND on a hub connection, answered with the hub's verdict: the send goes as
    /// one frame (or several parts, for more data than a frame holds; the fds go with the
    /// first), each fd with the rights its vfd holds, and the hub decides on the whole
    /// (delivered all together, or not at all). `Accepted` is OK. `Busy` (the receiver or
    /// its budget is full) is retried when the hub says `Ready`, for at most `send_wait`,
    /// then OUT_OF_MEMORY (nothing was sent: try again), as is a socket toward the hub that
    /// stays full that long. Any other refusal is ERR, the same for every reason.
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
        let deadline = Instant::now() + self.send_wait;
        let full = || {
            log::info!(
                "bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: the peer is not reading (back-pressure)"
            );
            ResponseCode::OutOfMemory
        };
        loop {
            let mut s = conn.begin(data.len()).map_err(|e| {
                log::info!("bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: {e}");
                ResponseCode::InvalidCmd
            })?;
            while !s.done() {
                match conn.send_next(&mut s, data, &fds) {
                    Ok(()) => {}
                    Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                        // The parts sent so far are dropped by the hub when the next send
                        // starts: nothing of this one is delivered.
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(full());
                        }
                        wait_for(conn.as_fd(), libc::POLLOUT, left);
                    }
                    Err(e) => {
                        log::info!("bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: {e}");
                        return Err(ResponseCode::Err);
                    }
                }
            }
            let mut ready = false;
            let until = Instant::now() + VERDICT_WAIT;
            let verdict = loop {
                match conn.take_verdict(&s, &mut ready) {
                    Ok(Some(v)) => break v,
                    Ok(None) => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            log::warn!(
                                "bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: no verdict from the hub in time"
                            );
                            return Err(ResponseCode::Err);
                        }
                        wait_for(conn.as_fd(), libc::POLLIN, left);
                    }
                    Err(e) => {
                        log::info!("bulkhead-vmm: virtio-wl: send on hub vfd {id:#x}: {e}");
                        return Err(ResponseCode::Err);
                    }
                }
            };
            match verdict {
                Ok(()) => return Ok(()),
                Err(Refusal::Busy) => {
                    // Wait for room: the hub says Ready; without it, try again after a
                    // short while. Either way within the send wait.
                    if !ready {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(full());
                        }
                        wait_for(conn.as_fd(), libc::POLLIN, left.min(BUSY_RETRY));
                        if conn.take_ready().is_err() {
                            return Err(ResponseCode::Err);
                        }
                    }
                    if Instant::now() >= deadline {
                        return Err(full());
                    }
                }
                Err(error) => {
                    log::info!(
                        "bulkhead-vmm: virtio-wl: the hub refused the send on vfd {id:#x}: {error:?}"
                    );
                    return Err(ResponseCode::Err);
                }
            }
        }
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
        let mut listener = None;
        let kind = match self.sockets.take(name, self.send_wait) {
            Ok(Connected::Stream(s)) => VfdKind::Socket(s),
            Ok(Connected::Hub(h)) => VfdKind::Hub(h),
            Err(SocketError::NotFound(_)) if self.hub.is_some() => {
                let hub = self.hub.as_mut().ok_or(ResponseCode::Err)?;
                match hub.resolve(name) {
                    Ok(Resolved::Listener { stream, id }) => {
                        listener = Some(id);
                        VfdKind::Socket(stream)
                    }
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
        let mut vfd = Vfd::new(kind);
        vfd.listener = listener;
        Ok(Response::VfdNew(self.insert(id, vfd)))
    }

    /// NEW_PIPE: `flags` is the direction (exactly one of READ, WRITE; the parser checked).
    /// The answer describes the vfd as created, like NEW_CTX's: with TRANS_FLAGS, READ when
    /// the guest reads it and WRITE when it writes it. ChromiumOS's driver gives the vfd
    /// file the mode of the answer's flags, so a write pipe answered 0 would be read-only
    /// there.
    fn new_pipe(&mut self, id: u32, flags: u32) -> Result<Response, ResponseCode> {
        self.check_new(id)?;
        let (read_end, write_end) = pipe()?;
        let guest_reads = flags == VFD_READ;
        let (local, remote) = if guest_reads {
            (read_end, write_end)
        } else {
            (write_end, read_end)
        };
        let vfd = Vfd::new(VfdKind::Pipe {
            local,
            remote: Some(remote),
            guest_reads,
        });
        Ok(Response::VfdNew(self.insert(id, vfd)))
    }
}
