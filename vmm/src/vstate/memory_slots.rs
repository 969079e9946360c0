//! Host memory mapped into the guest at run time, one KVM memory slot per mapping (shared
//! memory that devices such as virtio_wl hand to the guest, or VFIO BARs).
//!
//! A `HostMapping` owns an mmap of a file descriptor; `MemorySlots::map` puts it at a guest
//! physical address and returns a `SlotHandle`. Dropping the handle removes the slot from KVM
//! first and only then lets the mapping go, so the guest can never reach unmapped host memory.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;

/// Errors mapping memory into the guest.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// mmap of the fd failed.
    #[error("mmap of {len} bytes failed: {err}")]
    Mmap {
        /// Length.
        len: usize,
        /// Why.
        err: std::io::Error,
    },
    /// The address or length is not page-aligned, or is zero.
    #[error("guest address {addr:#x} / length {len:#x} not page-aligned or empty")]
    Alignment {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// No KVM memory slots left.
    #[error("no free KVM memory slot")]
    Exhausted,
    /// KVM refused the slot (overlap, or read-only memory unsupported).
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Kvm(kvm_ioctls::Error),
}

const PAGE: u64 = 4096;

/// An mmap of (a prefix of) a file descriptor, unmapped on drop.
pub struct HostMapping {
    addr: *mut libc::c_void,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory; the pointer is only handed to KVM and never
// dereferenced by this type, so moving it between threads is sound.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `&HostMapping` exposes only the address and length.
unsafe impl Sync for HostMapping {}

impl HostMapping {
    /// Maps `len` bytes of `fd` from offset 0, shared; read-only unless `writable`.
    pub fn map_fd(fd: &impl AsRawFd, len: usize, writable: bool) -> Result<Self, SlotError> {
        Self::map_fd_at(fd, 0, len, writable)
    }

    /// Maps `len` bytes of `fd` from `offset` (page-aligned), shared; read-only unless
    /// `writable` (a VFIO device region lives at a region-specific offset of the device fd).
    pub fn map_fd_at(
        fd: &impl AsRawFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<Self, SlotError> {
        let Ok(offset) = libc::off_t::try_from(offset) else {
            return Err(SlotError::Alignment {
                addr: offset,
                len: len as u64,
            });
        };
        if len == 0 || len as u64 % PAGE != 0 {
            return Err(SlotError::Alignment {
                addr: 0,
                len: len as u64,
            });
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(SlotError::Mmap {
                len,
                err: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            addr,
            len,
            writable,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (mappings are at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the guest may write it.
    pub fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping created in `map_fd`, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

struct SlotState {
    next: u32,
    free: Vec<u32>,
}

/// The VM's run-time memory slots.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    max_slots: u32,
    state: Mutex<SlotState>,
}

impl MemorySlots {
    /// Slots from `first` (after the RAM slots) up to `max_slots` (KVM_CAP_NR_MEMSLOTS).
    pub fn new(vm: Arc<VmFd>, first: u32, max_slots: u32) -> Self {
        Self {
            vm,
            max_slots,
            state: Mutex::new(SlotState {
                next: first,
                free: Vec::new(),
            }),
        }
    }

    /// Maps `mapping` at guest physical `guest_addr` (read-only in the guest if the mapping
    /// is not writable).
    pub fn map(
        self: &Arc<Self>,
        guest_addr: u64,
        mapping: Arc<HostMapping>,
    ) -> Result<SlotHandle, SlotError> {
        if guest_addr % PAGE != 0 {
            return Err(SlotError::Alignment {
                addr: guest_addr,
                len: mapping.len as u64,
            });
        }
        let slot = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match st.free.pop() {
                Some(s) => s,
                None if st.next < self.max_slots => {
                    st.next += 1;
                    st.next - 1
                }
                None => return Err(SlotError::Exhausted),
            }
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: if mapping.writable {
                0
            } else {
                KVM_MEM_READONLY
            },
            guest_phys_addr: guest_addr,
            memory_size: mapping.len as u64,
            userspace_addr: mapping.addr as u64,
        };
        // SAFETY: the host range is a live mmap owned by `mapping`, which the returned handle
        // keeps alive until after the slot is removed.
        if let Err(e) = unsafe { self.vm.set_user_memory_region(region) } {
            self.release(slot);
            return Err(SlotError::Kvm(e));
        }
        Ok(SlotHandle {
            slots: self.clone(),
            slot,
            guest_addr,
            mapping: Some(mapping),
        })
    }

    fn release(&self, slot: u32) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free
            .push(slot);
    }
}

/// One mapped slot; dropping it unmaps it from the guest.
pub struct SlotHandle {
    slots: Arc<MemorySlots>,
    slot: u32,
    guest_addr: u64,
    mapping: Option<Arc<HostMapping>>,
}

impl SlotHandle {
    /// Guest physical address.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// KVM slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.guest_addr,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-size region deletes the slot; no host memory is referenced.
        match unsafe { self.slots.vm.set_user_memory_region(region) } {
            Ok(()) => self.slots.release(self.slot),
            Err(e) => {
                // Keep the host mapping alive forever rather than let the guest see freed
                // memory; the slot number is not reused.
                log::error!("bulkhead-vmm: cannot remove memory slot {}: {e}", self.slot);
                std::mem::forget(self.mapping.take());
            }
        }
    }
}
