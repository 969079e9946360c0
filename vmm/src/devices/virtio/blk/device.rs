//! virtio-blk over a raw image file: read, write, flush (fdatasync) and get-id, one queue.
//! The guest sees `/dev/vda` (module `virtio_blk`).

use std::fs::File;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::request::{self, Disk, ID_BYTES, SECTOR_SIZE};
use crate::devices::virtio::worker::{serve_chains, spawn_queue_worker, QueueHandler, WorkerSlot};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::vstate::memory::GuestMemoryMmap;

const QUEUE_SIZES: [u16; 1] = [256];
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Most data segments per request the driver may use (queue size minus header and status).
const SEG_MAX: u32 = 254;

/// The block device.
pub struct Block {
    disk: Arc<Disk>,
    config: Vec<u8>,
    worker: WorkerSlot,
}

impl Block {
    /// A device over `file` (its length, rounded down to sectors, is the capacity). `file`
    /// may be a regular file or a block device (whose metadata length is 0, so the size is
    /// found by seeking to the end).
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let len = (&file).seek(SeekFrom::End(0))?;
        (&file).seek(SeekFrom::Start(0))?;
        let sectors = len / SECTOR_SIZE;
        let mut idb = [0u8; ID_BYTES];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&sectors.to_le_bytes()); // capacity
        config.extend_from_slice(&0u32.to_le_bytes()); // size_max
        config.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        Ok(Self {
            disk: Arc::new(Disk {
                file,
                sectors,
                read_only,
                id: idb,
            }),
            config,
            worker: WorkerSlot::default(),
        })
    }

    /// The disk, so the VMM can flush it to stable storage when the VM ends.
    pub fn disk(&self) -> Arc<Disk> {
        self.disk.clone()
    }
}

/// Processes the request queue.
pub struct BlockHandler {
    disk: Arc<Disk>,
}

impl BlockHandler {
    /// A handler for `disk`.
    pub fn new(disk: Arc<Disk>) -> Self {
        Self { disk }
    }
}

impl QueueHandler for BlockHandler {
    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_chains(queue, mem, "blk", |descs| {
            let out = request::execute(&self.disk, mem, descs);
            match out.status_addr {
                Some(addr) if mem.write_obj(out.status, addr).is_ok() => {
                    out.data_written.saturating_add(1)
                }
                _ => 0,
            }
        })
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn name(&self) -> &str {
        "blk"
    }
    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
        if self.disk.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if !activation.queues.iter().any(|q| q.index == 0) {
            return Err(ActivateError::MissingQueue(0));
        }
        let handler = BlockHandler::new(self.disk.clone());
        if self.worker.pending() {
            return Err(ActivateError::StillStopping);
        }
        self.worker.start(
            spawn_queue_worker("virtio-blk", handler, activation).map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.stop();
    }
    fn reset_pending(&mut self) -> bool {
        self.worker.pending()
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x01, 0x80) // mass storage, other
    }
}
