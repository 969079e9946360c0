//! A virtio_wl device state driven against virtio-queue's mock queues in guest memory, with
//! real KVM memory slots for its shared-memory window (this machine's /dev/kvm). Used by the
//! device tests (`virtio_wl.rs`) and the hub tests (`wl_hub.rs`); one device per simulated VM.

#![allow(dead_code)]

use std::sync::Arc;

use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::{WlLimits, WlState};
use bulkhead_vmm::devices::virtio::wl::vfd::ShmWindow;
use bulkhead_vmm::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use bulkhead_vmm::vstate::memory_slots::MemorySlots;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const CMD: u64 = 0x20_0000;
const RESP: u64 = 0x30_0000;
const IN_BUFS: u64 = 0x40_0000;
/// Guest address of the shared-memory window.
pub const WINDOW: u64 = 64 << 30;

/// One device with its guest memory.
pub struct Dev {
    /// Guest memory (32 MiB).
    pub mem: GuestMemoryMmap,
    /// The device state.
    pub st: WlState,
    /// Its socket registry.
    pub sockets: WlSockets,
    _vm: Arc<kvm_ioctls::VmFd>,
}

impl Dev {
    /// A device with TRANS_FLAGS negotiated and default limits.
    pub fn new() -> Dev {
        Dev::with(WlLimits::default(), VIRTIO_WL_F_TRANS_FLAGS)
    }

    /// A device with these limits and negotiated features.
    pub fn with(limits: WlLimits, features: u64) -> Dev {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let slots = Arc::new(MemorySlots::new(vm.clone(), 0, 64));
        let window = ShmWindow::new(Some(slots), WINDOW).unwrap();
        let sockets = WlSockets::new();
        let mut st = WlState::new(sockets.clone(), window, limits);
        st.set_features(features);
        Dev {
            mem: create_guest_memory(32 << 20).unwrap(),
            st,
            sockets,
            _vm: vm,
        }
    }

    /// Runs one command through a fresh out queue; returns the response bytes.
    pub fn submit(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.mem.write_slice(cmd, GuestAddress(CMD)).unwrap();
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0x10000), 16);
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(CMD, cmd.len() as u32, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(RESP, 64, WRITE, 0)),
        ];
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(self.st.process_out(&mut q, &self.mem));
        let len = mock.used().ring().ref_at(0).unwrap().load().len() as usize;
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        out
    }

    /// The response code of a command.
    pub fn code(&mut self, cmd: &[u8]) -> u32 {
        le32(&self.submit(cmd), 0).unwrap()
    }

    /// A NEW-type command that must succeed.
    pub fn new_vfd(&mut self, cmd: &[u8]) -> VfdNew {
        let r = self.submit(cmd);
        assert_eq!(le32(&r, 0), Some(RESP_VFD_NEW), "response {r:x?}");
        VfdNew {
            id: le32(&r, 8).unwrap(),
            flags: le32(&r, 12).unwrap(),
            pfn: le64(&r, 16).unwrap(),
            size: le32(&r, 24).unwrap(),
        }
    }

    /// Offers `count` 4096-byte in-queue buffers; returns the messages written into them.
    pub fn drain_in(&mut self, count: u16) -> Vec<InMessage> {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0x80000), 64);
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    IN_BUFS + u64::from(i) * 4096,
                    4096,
                    WRITE,
                    0,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        self.st.process_in(&mut q, &self.mem);
        let used = mock.used().idx().load();
        (0..used)
            .map(|i| {
                let e = mock.used().ring().ref_at(i as usize).unwrap().load();
                let mut b = vec![0u8; e.len() as usize];
                self.mem
                    .read_slice(&mut b, GuestAddress(IN_BUFS + u64::from(e.id()) * 4096))
                    .unwrap();
                parse_in_message(&b).expect("a valid in-queue message")
            })
            .collect()
    }

    /// Does what the worker does when fds are ready (hub channel, then vfds) until at least
    /// `n` messages are pending. A hang guard (20 s), not a timing assertion.
    pub fn pump_until(&mut self, n: usize) {
        for _ in 0..20_000 {
            self.st.read_hub();
            self.st.read_host();
            if self.st.pending() >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("only {} messages pending, wanted {n}", self.st.pending());
    }
}

/// A command header.
pub fn hdr(ty: u32) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&[0; 4]);
    v
}

/// A 64-byte vfd_new as the guest driver sends it.
pub fn vfd_new(ty: u32, id: u32, flags: u32, size: u32, name: &str) -> Vec<u8> {
    let mut v = hdr(ty);
    for x in [id, flags, 0, 0, size] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let mut n = [0u8; 36];
    n[..name.len()].copy_from_slice(name.as_bytes());
    v.extend_from_slice(&n);
    v
}

/// NEW_CTX_NAMED.
pub fn named(id: u32, name: &str) -> Vec<u8> {
    vfd_new(CMD_VFD_NEW_CTX_NAMED, id, 0, 0, name)
}

/// VFD_NEW (alloc).
pub fn alloc(id: u32, size: u32) -> Vec<u8> {
    vfd_new(CMD_VFD_NEW, id, 0, size, "")
}

/// VFD_CLOSE.
pub fn close(id: u32) -> Vec<u8> {
    let mut v = hdr(CMD_VFD_CLOSE);
    v.extend_from_slice(&id.to_le_bytes());
    v
}

/// VFD_SEND.
pub fn send(id: u32, vfds: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = hdr(CMD_VFD_SEND);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(vfds.len() as u32).to_le_bytes());
    for x in vfds {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.extend_from_slice(data);
    v
}
