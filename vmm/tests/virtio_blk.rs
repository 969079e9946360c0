//! virtio-blk request handling against virtio-queue's mock driver and a real image file:
//! write then read back, flush, get-id, and malformed chains that must get error statuses (or
//! nothing) and never a panic.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use bulkhead_vmm::devices::virtio::blk::device::{Block, BlockHandler};
use bulkhead_vmm::devices::virtio::blk::request::{
    Disk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use bulkhead_vmm::devices::virtio::worker::QueueHandler;
use bulkhead_vmm::devices::virtio::VirtioDevice;
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const HDR: u64 = 0x20_0000;
const DATA: u64 = 0x21_0000;
const STATUS: u64 = 0x22_0000;

struct Rig {
    mem: GuestMemoryMmap,
    image: tempfile::NamedTempFile,
    disk: Arc<Disk>,
}

fn rig(sectors: u64, read_only: bool) -> Rig {
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(sectors * 512).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.path())
        .unwrap();
    let blk = Block::new(f, read_only, "test-disk").unwrap();
    Rig {
        mem: common::memory(),
        disk: blk.disk(),
        image,
    }
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

/// Submits one chain and returns (used length, status byte).
fn submit(r: &Rig, descs: &[RawDescriptor]) -> (u32, u8) {
    r.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let mock = MockSplitQueue::create(&r.mem, GuestAddress(0x10000), 16);
    mock.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let mut h = BlockHandler::new(r.disk.clone());
    assert!(h.process(0, &mut q, &r.mem), "the chain is returned");
    assert_eq!(mock.used().idx().load(), 1);
    let len = mock.used().ring().ref_at(0).unwrap().load().len();
    (len, r.mem.read_obj(GuestAddress(STATUS)).unwrap())
}

#[test]
fn write_read_back_flush_and_id() {
    let r = rig(16, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    header(&r.mem, VIRTIO_BLK_T_OUT, 2);
    let (len, st) = submit(
        &r,
        &common::chain(
            0,
            &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
        ),
    );
    assert_eq!((len, st), (1, VIRTIO_BLK_S_OK));
    // The host sees the data at sector 2.
    let mut f = r.image.reopen().unwrap();
    f.seek(SeekFrom::Start(1024)).unwrap();
    let mut on_disk = vec![0u8; 1024];
    f.read_exact(&mut on_disk).unwrap();
    assert_eq!(on_disk, pattern);

    // Read it back through two buffers.
    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&r.mem, VIRTIO_BLK_T_IN, 2);
    let (len, st) = submit(
        &r,
        &common::chain(
            0,
            &[
                (HDR, 16, false),
                (DATA, 512, true),
                (DATA + 512, 512, true),
                (STATUS, 1, true),
            ],
        ),
    );
    assert_eq!((len, st), (1025, VIRTIO_BLK_S_OK));
    let mut back = vec![0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);

    header(&r.mem, VIRTIO_BLK_T_FLUSH, 0);
    let (_, st) = submit(
        &r,
        &common::chain(0, &[(HDR, 16, false), (STATUS, 1, true)]),
    );
    assert_eq!(st, VIRTIO_BLK_S_OK);

    header(&r.mem, VIRTIO_BLK_T_GET_ID, 0);
    let (len, st) = submit(
        &r,
        &common::chain(0, &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
    );
    assert_eq!((len, st), (21, VIRTIO_BLK_S_OK));
    let mut id = [0u8; 9];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"test-disk");
}

#[test]
fn malformed_requests_get_error_statuses() {
    let r = rig(4, false);
    // Out of range: sector 4 of a 4-sector disk.
    header(&r.mem, VIRTIO_BLK_T_IN, 4);
    let ok_shape = common::chain(0, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(submit(&r, &ok_shape).1, VIRTIO_BLK_S_IOERR);
    // Sector number that overflows when multiplied by 512.
    header(&r.mem, VIRTIO_BLK_T_IN, u64::MAX / 2);
    assert_eq!(submit(&r, &ok_shape).1, VIRTIO_BLK_S_IOERR);
    // Read into a device-readable buffer (wrong direction).
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    let wrong = common::chain(
        0,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    assert_eq!(submit(&r, &wrong).1, VIRTIO_BLK_S_IOERR);
    // Unknown request type.
    header(&r.mem, 0x77, 0);
    assert_eq!(submit(&r, &ok_shape).1, VIRTIO_BLK_S_UNSUPP);
    // Header too short.
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    let short = common::chain(0, &[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(submit(&r, &short).1, VIRTIO_BLK_S_IOERR);
    // Header in device-writable memory.
    let whdr = common::chain(0, &[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(submit(&r, &whdr).1, VIRTIO_BLK_S_IOERR);
    // Data buffer outside guest memory.
    let far = common::chain(
        0,
        &[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)],
    );
    assert_eq!(submit(&r, &far).1, VIRTIO_BLK_S_IOERR);
    // No writable status byte: returned with length 0, status memory untouched.
    let nostatus = common::chain(0, &[(HDR, 16, false), (DATA, 512, false)]);
    assert_eq!(submit(&r, &nostatus), (0, 0xaa));
    // A lone descriptor.
    assert_eq!(
        submit(&r, &common::chain(0, &[(STATUS, 1, true)])),
        (0, 0xaa)
    );
}

/// Every guest address and length is added with checks: a status or data descriptor that
/// ends past the top of the 64-bit address space is a malformed chain (returned with
/// nothing written, or an I/O error), never an overflow.
#[test]
fn descriptors_at_the_top_of_the_address_space_do_not_overflow() {
    let r = rig(4, false);
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    let top = u64::MAX - 7;
    let status_wraps = common::chain(0, &[(HDR, 16, false), (DATA, 512, true), (top, 16, true)]);
    assert_eq!(submit(&r, &status_wraps), (0, 0xaa));
    let data_wraps = common::chain(0, &[(HDR, 16, false), (top, 512, true), (STATUS, 1, true)]);
    assert_eq!(submit(&r, &data_wraps).1, VIRTIO_BLK_S_IOERR);
    let header_wraps = common::chain(0, &[(top, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(submit(&r, &header_wraps).1, VIRTIO_BLK_S_IOERR);
}

#[test]
fn looping_chain_terminates() {
    let r = rig(4, false);
    header(&r.mem, VIRTIO_BLK_T_IN, 0);
    // Descriptor 1 points back to descriptor 0: the chain is cut by the queue's TTL.
    let mut descs = common::chain(0, &[(HDR, 16, false), (DATA, 512, true)]);
    let looped =
        virtio_queue::desc::split::Descriptor::new(DATA, 512, common::WRITE | common::NEXT, 0);
    descs[1] = RawDescriptor::from(looped);
    let (len, _) = submit(&r, &descs);
    assert!(len <= 512 * 16 + 1);
}

#[test]
fn read_only_disks_refuse_writes() {
    let r = rig(4, true);
    header(&r.mem, VIRTIO_BLK_T_OUT, 0);
    let st = submit(
        &r,
        &common::chain(
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        ),
    )
    .1;
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    let f = tempfile::tempfile().unwrap();
    f.set_len(4096).unwrap();
    let blk = Block::new(f, true, "ro").unwrap();
    assert_ne!(blk.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8, "capacity in sectors");
}
