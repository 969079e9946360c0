//! The two virtqueues: the out queue's chains become commands (`WlState::handle`) and
//! their answers; pending in-queue messages go into the buffers the guest posted.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{Response, ResponseCode, MAX_COMMAND_SIZE};
use super::state::WlState;
use crate::vstate::memory::GuestMemoryMmap;

impl WlState {
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
        self.process_out_while(queue, mem, |_| true)
    }

    /// Handles the commands on the out queue until it is empty or `go_on` says false, which
    /// is asked before each chain (a command may wait, bounded, for a peer or the hub, and a
    /// guest can post a queue's worth of them): the worker stops there when told to, and
    /// applies a move of the shared-memory window that waited for it.
    pub fn process_out_while(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        mut go_on: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let mut used = false;
        loop {
            if !go_on(self) {
                return used;
            }
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
