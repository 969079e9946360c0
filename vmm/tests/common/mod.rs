//! Helpers shared by the virtio tests: guest memory, descriptor chains, waiting on eventfds.

#![allow(dead_code)]

pub mod driver_queue;
pub mod hub;
pub mod netring;

use std::os::fd::AsRawFd;

use bulkhead_vmm::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vmm_sys_util::eventfd::EventFd;

/// Descriptor flag: another descriptor follows.
pub const NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const WRITE: u16 = 2;

/// 32 MiB of guest memory.
pub fn memory() -> GuestMemoryMmap {
    create_guest_memory(32 << 20).unwrap()
}

/// A chain of (addr, len, device-writable) descriptors starting at index `first`, with the
/// next links filled in.
pub fn chain(first: u16, parts: &[(u64, u32, bool)]) -> Vec<RawDescriptor> {
    parts
        .iter()
        .enumerate()
        .map(|(i, (addr, len, w))| {
            let last = i + 1 == parts.len();
            let mut flags = if *w { WRITE } else { 0 };
            if !last {
                flags |= NEXT;
            }
            RawDescriptor::from(SplitDescriptor::new(
                *addr,
                *len,
                flags,
                first + i as u16 + 1,
            ))
        })
        .collect()
}

/// Waits (with a 20 s deadline, as a hang guard only) until `evt` is readable.
pub fn wait_readable(evt: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 20_000) };
    n == 1 && evt.read().is_ok()
}
