//! Parsing and executing one virtio-blk request against a raw image file. Every field comes
//! from the guest: the chain shape, the header, the sector range and every buffer address are
//! checked, and a bad request gets an error status (or, if it has no status byte, is returned
//! with nothing written). All arithmetic on guest addresses, lengths and sectors is checked:
//! a range that would pass the top of the address space (or of the disk) is malformed.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::GuestMemoryMmap;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also: malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the ID string.
pub const ID_BYTES: usize = 20;
const HEADER_LEN: u32 = 16;
const CHUNK: usize = 64 * 1024;

/// Why a request failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain lacks a readable header or a writable status byte.
    #[error("malformed descriptor chain")]
    BadChain,
    /// A buffer has the wrong direction for the request type.
    #[error("buffer direction does not match the request")]
    BadDirection,
    /// The sector range is outside the disk.
    #[error("sectors outside the disk")]
    OutOfRange,
    /// A guest address is outside guest memory.
    #[error("buffer outside guest memory")]
    GuestMemory,
    /// The host file operation failed.
    #[error("I/O error: {0}")]
    Io(String),
    /// Writing to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The status byte reported to the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The backing disk.
pub struct Disk {
    /// The raw image.
    pub file: File,
    /// Size in sectors.
    pub sectors: u64,
    /// Writes refused.
    pub read_only: bool,
    /// The ID string (GET_ID).
    pub id: [u8; ID_BYTES],
}

/// The outcome of one chain: the status to write (if there is a status byte) and the number of
/// bytes written into guest buffers (including the status byte).
pub struct Outcome {
    /// Where to write the status, if the chain has a writable last byte.
    pub status_addr: Option<GuestAddress>,
    /// The status.
    pub status: u8,
    /// Bytes written into the guest's data buffers.
    pub data_written: u32,
}

/// Executes the request formed by `descs` (in chain order).
pub fn execute(disk: &Disk, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Outcome {
    // The status byte is the last byte of the last descriptor.
    let status_addr = descs
        .last()
        .filter(|d| d.is_write_only() && d.len() >= 1 && descs.len() >= 2)
        .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1))
        .map(GuestAddress);
    let mut written = 0u32;
    let res = match status_addr {
        None => Err(RequestError::BadChain),
        Some(_) => run(disk, mem, descs, &mut written),
    };
    let status = match &res {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => {
            log::debug!("bulkhead-vmm: virtio-blk request failed: {e}");
            e.status()
        }
    };
    Outcome {
        status_addr,
        status,
        data_written: written,
    }
}

fn run(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    written: &mut u32,
) -> Result<(), RequestError> {
    let (header, rest) = descs.split_first().ok_or(RequestError::BadChain)?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadChain);
    }
    let kind: u32 = mem
        .read_obj(GuestAddress(header.addr().0))
        .map_err(|_| RequestError::GuestMemory)?;
    let sector_addr = header
        .addr()
        .0
        .checked_add(8)
        .ok_or(RequestError::GuestMemory)?;
    let sector: u64 = mem
        .read_obj(GuestAddress(sector_addr))
        .map_err(|_| RequestError::GuestMemory)?;
    // The last descriptor is the status; the data buffers are in between. A status descriptor
    // longer than one byte carries data before its last byte.
    let (status_desc, data) = rest.split_last().ok_or(RequestError::BadChain)?;
    let mut buffers: Vec<(u64, u64, bool)> = data
        .iter()
        .map(|d| (d.addr().0, u64::from(d.len()), d.is_write_only()))
        .collect();
    if status_desc.len() > 1 {
        buffers.push((status_desc.addr().0, u64::from(status_desc.len()) - 1, true));
    }
    // Each buffer must lie below the top of the address space.
    if buffers
        .iter()
        .any(|(addr, len, _)| addr.checked_add(*len).is_none())
    {
        return Err(RequestError::GuestMemory);
    }
    let total = buffers
        .iter()
        .try_fold(0u64, |t, b| t.checked_add(b.1))
        .ok_or(RequestError::OutOfRange)?;

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            if buffers.iter().any(|b| b.2 == write) {
                return Err(RequestError::BadDirection);
            }
            if write && disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            let start = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange)?;
            let end = start.checked_add(total).ok_or(RequestError::OutOfRange)?;
            let disk_end = disk
                .sectors
                .checked_mul(SECTOR_SIZE)
                .ok_or(RequestError::OutOfRange)?;
            if end > disk_end {
                return Err(RequestError::OutOfRange);
            }
            let mut pos = start;
            let mut chunk = vec![0u8; CHUNK];
            for (addr, len, _) in buffers {
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    let buf = chunk.get_mut(..n).ok_or(RequestError::BadChain)?;
                    let gaddr =
                        GuestAddress(addr.checked_add(done).ok_or(RequestError::GuestMemory)?);
                    if write {
                        mem.read_slice(buf, gaddr)
                            .map_err(|_| RequestError::GuestMemory)?;
                        disk.file
                            .write_all_at(buf, pos)
                            .map_err(|e| RequestError::Io(e.to_string()))?;
                    } else {
                        disk.file
                            .read_exact_at(buf, pos)
                            .map_err(|e| RequestError::Io(e.to_string()))?;
                        mem.write_slice(buf, gaddr)
                            .map_err(|_| RequestError::GuestMemory)?;
                        *written = written.saturating_add(n as u32);
                    }
                    done = done.checked_add(n as u64).ok_or(RequestError::BadChain)?;
                    pos = pos.checked_add(n as u64).ok_or(RequestError::OutOfRange)?;
                }
            }
            Ok(())
        }
        VIRTIO_BLK_T_FLUSH => disk
            .file
            .sync_data()
            .map_err(|e| RequestError::Io(e.to_string())),
        VIRTIO_BLK_T_GET_ID => {
            let (addr, len, w) = buffers.first().copied().ok_or(RequestError::BadChain)?;
            if !w {
                return Err(RequestError::BadDirection);
            }
            let n = (len as usize).min(ID_BYTES);
            let id = disk.id.get(..n).ok_or(RequestError::BadChain)?;
            mem.write_slice(id, GuestAddress(addr))
                .map_err(|_| RequestError::GuestMemory)?;
            *written = n as u32;
            Ok(())
        }
        other => Err(RequestError::Unsupported(other)),
    }
}
