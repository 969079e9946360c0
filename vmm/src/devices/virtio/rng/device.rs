//! virtio-rng: one queue; every device-writable buffer the guest offers is filled from the
//! host's `getrandom(2)`. The guest sees it as `/dev/hwrng` (module `virtio_rng`).

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::worker::{serve_chains, spawn_queue_worker, QueueHandler, WorkerSlot};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::vstate::memory::GuestMemoryMmap;

const QUEUE_SIZES: [u16; 1] = [256];
/// At most this many bytes are produced per request (bounded work per buffer).
const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: WorkerSlot,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Self::default()
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0usize;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            return false;
        };
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

/// Processes the request queue.
pub struct RngHandler;

impl RngHandler {
    /// Fills the writable buffers of one chain; returns the bytes written.
    fn serve(chain: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let mut written = 0u32;
        let mut buf = Vec::new();
        for desc in chain {
            if !desc.is_write_only() {
                continue; // a read-only buffer has nothing for us: skipped
            }
            let len = desc
                .len()
                .min(MAX_BYTES_PER_REQUEST.saturating_sub(written));
            if len == 0 {
                break;
            }
            buf.resize(len as usize, 0);
            if !fill_random(&mut buf) {
                break;
            }
            if mem.write_slice(&buf, GuestAddress(desc.addr().0)).is_err() {
                log::warn!("bulkhead-vmm: virtio-rng: buffer outside guest memory");
                break;
            }
            written += len;
        }
        written
    }
}

impl QueueHandler for RngHandler {
    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_chains(queue, mem, "rng", |descs| Self::serve(descs, mem))
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &str {
        "rng"
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if !activation.queues.iter().any(|q| q.index == 0) {
            return Err(ActivateError::MissingQueue(0));
        }
        if self.worker.pending() {
            return Err(ActivateError::StillStopping);
        }
        self.worker.start(
            spawn_queue_worker("virtio-rng", RngHandler, activation)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.stop();
    }
    fn reset_pending(&mut self) -> bool {
        self.worker.pending()
    }
}
