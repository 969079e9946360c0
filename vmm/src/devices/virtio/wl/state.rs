//! The device's state, independent of threads: the vfd table and what it holds (shared
//! memory, limits, pending in-queue messages, the hub link). The mechanisms that act on it
//! live beside it: `commands` (out-queue commands), `host_reads` (host fds and hub frames
//! into in-queue messages) and `queues` (moving buffers through the two virtqueues). The
//! worker (`device.rs`) drives it; tests drive it step by step against mock queues.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use bulkhead_policy::Rights;

use super::hub::HubLink;
use super::protocol::{
    InMessage, ResponseCode, VfdNew, VFD_HOST_ID_BIT, VIRTIO_WL_F_TRANS_FLAGS,
    VIRTIO_WL_F_USE_SHMEM,
};
use super::sockets::WlSockets;
use super::vfd::{ShmWindow, Vfd, VfdKind};

pub use super::limits::{WlLimits, DEFAULT_SEND_WAIT};

/// Everything the device knows.
pub struct WlState {
    pub(super) vfds: BTreeMap<u32, Vfd>,
    pub(super) window: ShmWindow,
    pub(super) sockets: WlSockets,
    pub(super) limits: WlLimits,
    pub(super) shm_bytes: u64,
    pub(super) shm_count: usize,
    pub(super) next_host_id: u32,
    pub(super) pending: VecDeque<InMessage>,
    pub(super) features: u64,
    pub(super) hub: Option<HubLink>,
    /// Objects the hub delivered: how many vfds hold each (Release when the last closes).
    pub(super) hub_refs: BTreeMap<(u64, u64), usize>,
    pub(super) send_wait: Duration,
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

    pub(super) fn trans_flags(&self) -> bool {
        self.features & VIRTIO_WL_F_TRANS_FLAGS != 0
    }

    pub(super) fn use_shmem(&self) -> bool {
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

    pub(super) fn remove_vfd(&mut self, id: u32) -> bool {
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
                if let (Some(l), Some(h)) = (v.listener, self.hub.as_mut()) {
                    h.drop_listener(l);
                }
                true
            }
            None => false,
        }
    }

    pub(super) fn unref_hub(&mut self, key: (u64, u64)) {
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

    pub(super) fn insert(&mut self, id: u32, vfd: Vfd) -> VfdNew {
        if let Some(obj) = &vfd.hub {
            *self.hub_refs.entry(obj.key).or_insert(0) += 1;
        }
        let d = vfd.describe(id, self.trans_flags(), &self.window, self.use_shmem());
        self.vfds.insert(id, vfd);
        d
    }

    pub(super) fn check_new(&self, id: u32) -> Result<(), ResponseCode> {
        if self.vfds.contains_key(&id) {
            return Err(ResponseCode::InvalidId);
        }
        if self.vfds.len() >= self.limits.max_vfds {
            return Err(ResponseCode::OutOfMemory);
        }
        Ok(())
    }

    pub(super) fn check_shm(&self, size: u64) -> Result<(), ResponseCode> {
        if self.shm_count >= self.limits.max_shm_count
            || self.shm_bytes.saturating_add(size) > self.limits.max_shm_bytes
        {
            return Err(ResponseCode::OutOfMemory);
        }
        Ok(())
    }

    pub(super) fn alloc_host_id(&mut self) -> Option<u32> {
        for _ in 0..=VFD_HOST_ID_BIT {
            let id = VFD_HOST_ID_BIT | (self.next_host_id & (VFD_HOST_ID_BIT - 1));
            self.next_host_id = self.next_host_id.wrapping_add(1);
            if !self.vfds.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}
