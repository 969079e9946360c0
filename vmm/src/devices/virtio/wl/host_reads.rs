//! Host input: reading the host fds of vfds (sockets, pipes) and hub connection frames
//! into in-queue messages (VFD_NEW for each received fd, then VFD_RECV; VFD_HUP at EOF),
//! within the per-VM limits.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use bulkhead_ipc::channel::ChannelError;
use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
use bulkhead_ipc::hub::protocol::FdInfo;
use bulkhead_policy::{FdType, Rights};

use super::protocol::{InMessage, MAX_RECV_DATA};
use super::scm;
use super::state::WlState;
use super::vfd::{host_vfd_kind, inspect_host_fd, page_align, HostFd, HubObject, Vfd, VfdKind};

/// Does a delivered fd become a shared-memory vfd (a memfd the VM may map)?
fn maps_shm(info: &FdInfo) -> bool {
    info.fd_type == FdType::Memfd && info.rights.contains(Rights::MAP)
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

    /// Hands on the events of hub vfds already read from their sockets (a SEND waiting for
    /// its verdict reads what else arrives meanwhile; those sockets may not poll readable
    /// again, so they are not left waiting for it). Already in memory and bounded by the
    /// hub's queue toward this VM, so taken even while back-pressured. Returns the messages
    /// queued.
    pub fn read_buffered(&mut self) -> usize {
        let before = self.pending.len();
        let ids: Vec<u32> = self
            .vfds
            .iter()
            .filter(|(_, v)| matches!(&v.kind, VfdKind::Hub(h) if h.has_buffered()))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            while matches!(self.vfds.get(&id).map(|v| &v.kind), Some(VfdKind::Hub(h)) if h.has_buffered())
            {
                self.read_hub_vfd(id);
            }
        }
        self.pending.len() - before
    }

    /// Reads every host fd that has input now, without blocking. Returns the messages queued.
    pub fn read_host(&mut self) -> usize {
        self.read_buffered();
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
        let got = match self.vfds.get_mut(&id).map(|v| &mut v.kind) {
            Some(VfdKind::Hub(h)) => h.try_recv(),
            _ => return,
        };
        let (data, fds) = match got {
            Ok(Incoming::Message { data, fds }) => (data, fds),
            // Verdicts belong to a SEND, which took its own; one left here is stale (its
            // send gave up waiting), and Ready only matters to a send waiting for it.
            Ok(Incoming::Refused { seq, error }) => {
                log::info!(
                    "bulkhead-vmm: virtio-wl: a late verdict on vfd {id:#x}: send {seq} refused ({error:?})"
                );
                return;
            }
            Ok(Incoming::Accepted { seq }) => {
                log::info!(
                    "bulkhead-vmm: virtio-wl: a late verdict on vfd {id:#x}: send {seq} accepted"
                );
                return;
            }
            Ok(Incoming::Ready) => return,
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
            // A socket from the hub is never the socket another VM sent: it is this VM's end
            // of a hub-mediated connection, which carries frames checked by the hub.
            FdType::Socket => {
                VfdKind::Hub(HubConn::from_fd(fd).map_err(|_| "cannot adopt a mediated socket")?)
            }
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
}
