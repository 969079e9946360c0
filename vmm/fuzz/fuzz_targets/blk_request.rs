//! Fuzz virtio-blk request execution: chains a hostile guest builds (headers with any type
//! and sector, data buffers anywhere in guest memory or past it, any direction, status
//! descriptors of any size, loops) through the device's queue handler, over real guest
//! memory and a real disk file (a memfd of 16 sectors).
//!
//! Checks: no panic; every returned chain's length is at most what its writable buffers
//! hold; a request never touches the disk outside its 16 sectors (the file keeps its size)
//! and never writes a read-only disk (its bytes are unchanged).
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bulkhead_vmm::devices::virtio::blk::device::BlockHandler;
use bulkhead_vmm::devices::virtio::blk::request::{
    Disk, ID_BYTES, SECTOR_SIZE, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use bulkhead_vmm::devices::virtio::worker::QueueHandler;
use bulkhead_vmm_fuzz::{memory, Addr, Desc, RawQueue, STAGING};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const SECTORS: u64 = 16;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Other(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Sector {
    Near(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Request {
    /// A request in the usual shape: header, data buffers, status; every field chosen.
    Shaped {
        kind: Kind,
        sector: Sector,
        header_at: Addr,
        header_len: u8,
        header_writable: bool,
        data: Vec<(Addr, u16, bool)>,
        status_at: Addr,
        status_len: u8,
        status_writable: bool,
    },
    /// Any chain.
    Raw {
        header: (Kind, Sector),
        descs: Vec<Desc>,
    },
    /// A head index as is.
    Head(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    read_only: bool,
    fill: u8,
    requests: Vec<Request>,
}

fn kind(k: Kind) -> u32 {
    match k {
        Kind::In => VIRTIO_BLK_T_IN,
        Kind::Out => VIRTIO_BLK_T_OUT,
        Kind::Flush => VIRTIO_BLK_T_FLUSH,
        Kind::GetId => VIRTIO_BLK_T_GET_ID,
        Kind::Other(v) => v,
    }
}

fn sector(s: Sector) -> u64 {
    match s {
        Sector::Near(n) => u64::from(n % 24),
        Sector::Any(v) => v,
    }
}

fn disk_file() -> Option<std::fs::File> {
    // SAFETY: a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd nothing else owns.
    Some(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn run(input: Input) {
    let mem = memory();
    let Some(file) = disk_file() else { return };
    let image = vec![input.fill; (SECTORS * SECTOR_SIZE) as usize];
    if file.write_all_at(&image, 0).is_err() {
        return;
    }
    let disk = Arc::new(Disk {
        file,
        sectors: SECTORS,
        read_only: input.read_only,
        id: [b'f'; ID_BYTES],
    });
    let mut handler = BlockHandler::new(disk.clone());
    let mut rq = RawQueue::new(&mem, 0);
    // Header staged at the start of the staging area.
    for r in input.requests.into_iter().take(16) {
        let writable: u64;
        let pushed = match r {
            Request::Shaped {
                kind: k,
                sector: s,
                header_at,
                header_len,
                header_writable,
                data,
                status_at,
                status_len,
                status_writable,
            } => {
                let at = header_at.get();
                let _ = mem.write_obj(kind(k), GuestAddress(at));
                if let Some(a) = at.checked_add(8) {
                    let _ = mem.write_obj(sector(s), GuestAddress(a));
                }
                let mut descs = vec![Desc {
                    addr: Addr::Any(at),
                    len: u32::from(header_len),
                    write: header_writable,
                    next: None,
                    extra_flags: 0,
                }];
                for (a, l, w) in data.iter().take(8) {
                    descs.push(Desc {
                        addr: *a,
                        len: u32::from(*l),
                        write: *w,
                        next: None,
                        extra_flags: 0,
                    });
                }
                descs.push(Desc {
                    addr: status_at,
                    len: u32::from(status_len),
                    write: status_writable,
                    next: None,
                    extra_flags: 0,
                });
                writable = descs
                    .iter()
                    .filter(|d| d.write)
                    .map(|d| u64::from(d.len))
                    .sum();
                rq.push(&mem, &descs)
            }
            Request::Raw { header, descs } => {
                let _ = mem.write_obj(kind(header.0), GuestAddress(STAGING));
                let _ = mem.write_obj(sector(header.1), GuestAddress(STAGING + 8));
                let descs: Vec<Desc> = descs.into_iter().take(16).collect();
                writable = u64::MAX; // loops may revisit descriptors
                rq.push(&mem, &descs)
            }
            Request::Head(h) => {
                rq.push_head(&mem, h);
                writable = u64::MAX;
                true
            }
        };
        if !pushed {
            break;
        }
        let before = rq.used_idx(&mem);
        let mut q = rq.queue_resumed(&mem);
        handler.process(0, &mut q, &mem);
        let after = rq.used_idx(&mem);
        for i in before..after {
            let (_, len) = rq.used_elem(&mem, i);
            if u64::from(len) > writable {
                panic!("used length {len} > {writable} writable bytes");
            }
        }
        rq.recycle();
    }
    let len = disk.file.metadata().map(|m| m.len()).unwrap_or(0);
    if len != SECTORS * SECTOR_SIZE {
        panic!(
            "the disk file is {len} bytes, not {}",
            SECTORS * SECTOR_SIZE
        );
    }
    if input.read_only {
        let mut now = vec![0u8; image.len()];
        if disk.file.read_exact_at(&mut now, 0).is_ok() && now != image {
            panic!("a read-only disk was written");
        }
    }
}

fuzz_target!(|input: Input| run(input));
