//! A device worker busy in a command that waits (here: virtio_wl resolving a hub name, with a
//! hub that takes its time to answer) must never hold up a vCPU. A guest reset (status 0)
//! and a move of BAR 2 run on a vCPU holding the device's lock (and, for the BAR, the PCI
//! bus's), so neither may join the worker or wait for the state lock it holds; the worker
//! stops between chains, and the guest reads a non-zero status until it has.
//!
//! The "hub" is a socketpair end this test holds (`fake_hub_` in the names: it injects the
//! slow answer); the transport is the real one with the real virtio_wl device behind it, on
//! virtio-queue's mock queues in guest memory.

mod common;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::protocol::{HubEvent, Refusal, VmRequest};
use bulkhead_vmm::devices::bus::Bus;
use bulkhead_vmm::devices::pci::bus::PciBus;
use bulkhead_vmm::devices::pci::device::PciDevice;
use bulkhead_vmm::devices::virtio::status;
use bulkhead_vmm::devices::virtio::transport_pci::{VirtioPciDevice, NOTIFY_OFFSET};
use bulkhead_vmm::devices::virtio::wl::device::Wl;
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const BAR: u64 = 0xc000_0000;
const SHM: u64 = 0x10_0000_0000;
const CMDS: u64 = 0x20_0000;
const RESPS: u64 = 0x30_0000;
/// How long the device waits for a hub answer here: far longer than any test runs, so a
/// reset or BAR move that waited for the worker could not finish before the test answers.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3600);
/// A hang guard, not a timing assertion.
const GUARD: Duration = Duration::from_secs(20);

type Shared = Arc<Mutex<VirtioPciDevice>>;

fn w(d: &Shared, off: u64, v: &[u8]) {
    d.lock().unwrap().bar_write(0, off, v);
}

fn status_of(d: &Shared) -> u8 {
    let mut b = [0u8];
    d.lock().unwrap().bar_read(0, 0x14, &mut b);
    b[0]
}

fn hang_guard(ch: &Channel) {
    let tv = libc::timeval {
        tv_sec: GUARD.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO with a timeval of the right size on an open socket.
    let r = unsafe {
        libc::setsockopt(
            ch.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

fn named(id: u32, name: &str) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    c[..4].copy_from_slice(&CMD_VFD_NEW_CTX_NAMED.to_le_bytes());
    c[8..12].copy_from_slice(&id.to_le_bytes());
    c[28..28 + name.len()].copy_from_slice(name.as_bytes());
    c
}

fn alloc(id: u32, size: u32) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    c[..4].copy_from_slice(&CMD_VFD_NEW.to_le_bytes());
    c[8..12].copy_from_slice(&id.to_le_bytes());
    c[24..28].copy_from_slice(&size.to_le_bytes());
    c
}

/// A virtio_wl device behind the PCI transport whose hub link leads to the returned
/// channel end (its Hello already read), driven to DRIVER_OK with `cmds` on the out queue
/// (chain i: command at CMDS + i * 0x100, 64-byte answer at RESPS + i * 0x100) and the out
/// queue notified.
struct Rig {
    // Dropped first: a worker still waiting for an answer then sees the hub gone and exits,
    // so a failed test does not hang in the device's drop.
    hub: Channel,
    dev: Shared,
    mem: GuestMemoryMmap,
    out: MockSplitQueue<'static, GuestMemoryMmap>,
}

fn rig(cmds: &[Vec<u8>]) -> Rig {
    // The mock queues borrow the memory; the rig lives for the whole test.
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(common::memory()));
    let sockets = WlSockets::new();
    let mut wl = Wl::new(sockets.clone(), None, WlLimits::default()).unwrap();
    let (ours, hub) = Channel::pair().unwrap();
    hang_guard(&hub);
    let mut link = HubLink::new(ours.into_fd(), sockets).unwrap();
    link.set_answer_timeout(ANSWER_TIMEOUT);
    wl.set_hub(link);
    assert_eq!(hub.recv::<VmRequest>().unwrap().0, VmRequest::Hello);
    let mut pci = VirtioPciDevice::new_unrouted(Box::new(wl), mem.clone(), BAR, SHM).unwrap();
    pci.config_write(1, 0, &[0x02]); // memory decoding on
    let dev: Shared = Arc::new(Mutex::new(pci));

    let inq = MockSplitQueue::create(mem, GuestAddress(0x18000), 16);
    let out = MockSplitQueue::create(mem, GuestAddress(0x10000), 16);
    for (i, c) in cmds.iter().enumerate() {
        let i = i as u64;
        mem.write_slice(c, GuestAddress(CMDS + i * 0x100)).unwrap();
        out.add_desc_chains(
            &common::chain(
                2 * i as u16,
                &[(CMDS + i * 0x100, 64, false), (RESPS + i * 0x100, 64, true)],
            ),
            2 * i as u16,
        )
        .unwrap();
    }
    w(&dev, 0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
    w(&dev, 0x08, &0u32.to_le_bytes());
    w(&dev, 0x0c, &(VIRTIO_WL_F_TRANS_FLAGS as u32).to_le_bytes());
    w(&dev, 0x08, &1u32.to_le_bytes());
    w(&dev, 0x0c, &1u32.to_le_bytes()); // VERSION_1
    w(
        &dev,
        0x14,
        &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
    );
    for (q, m) in [(0u16, &inq), (1u16, &out)] {
        w(&dev, 0x16, &q.to_le_bytes());
        w(&dev, 0x18, &16u16.to_le_bytes());
        w(&dev, 0x20, &(m.desc_table_addr().0 as u32).to_le_bytes());
        w(&dev, 0x28, &(m.avail_addr().0 as u32).to_le_bytes());
        w(&dev, 0x30, &(m.used_addr().0 as u32).to_le_bytes());
        w(&dev, 0x1c, &1u16.to_le_bytes());
    }
    w(&dev, 0x14, &[0xf]); // DRIVER_OK
    assert_eq!(status_of(&dev), 0xf);
    w(&dev, NOTIFY_OFFSET + 4, &1u16.to_le_bytes()); // trapped notify of queue 1
    Rig {
        hub,
        dev,
        mem: mem.clone(),
        out,
    }
}

/// The worker's `Connect` for chain 1: proof that it is inside the wait now.
fn connect_tag(hub: &Channel) -> u32 {
    match hub.recv::<VmRequest>().unwrap().0 {
        VmRequest::Connect { tag, .. } => tag,
        other => panic!("expected Connect, got {other:?}"),
    }
}

/// Runs `f` on another thread (a second vCPU) and says whether it returned within the hang
/// guard.
fn returns(f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(GUARD).is_ok()
}

#[test]
fn fake_hub_a_guest_reset_never_waits_for_a_busy_wl_worker() {
    let r = rig(&[named(1, "svc"), named(2, "svc"), named(3, "svc")]);
    let tag = connect_tag(&r.hub);
    // The worker waits for the hub's answer to chain 1. The guest resets the device.
    let dev = r.dev.clone();
    assert!(
        returns(move || w(&dev, 0x14, &[0])),
        "the reset waited for the worker"
    );
    // Until the worker has stopped, the guest reads a non-zero status, and another vCPU's
    // accesses go through.
    assert_ne!(
        status_of(&r.dev),
        0,
        "reset reported before the worker stopped"
    );
    // A DRIVER_OK written before the reset finished is ignored (checked below: the status
    // becomes 0 and stays).
    w(&r.dev, 0x14, &[0xf]);

    // The hub answers chain 1: the worker finishes it, sees the stop and takes no other.
    r.hub
        .send(
            &HubEvent::Refused {
                tag,
                error: Refusal::PermissionDenied,
            },
            &[],
        )
        .unwrap();
    // What the hub hears next is the reset's Hello (the worker cleared the state as it
    // exited), not a Connect for chain 2.
    assert_eq!(r.hub.recv::<VmRequest>().unwrap().0, VmRequest::Hello);
    for _ in 0..20_000 {
        if status_of(&r.dev) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(status_of(&r.dev), 0, "the reset never finished");
    assert_eq!(r.out.used().idx().load(), 1, "one chain answered");
    let code: u32 = r.mem.read_obj(GuestAddress(RESPS)).unwrap();
    assert_eq!(code, RESP_ERR);
    assert!(matches!(
        r.hub.try_recv::<VmRequest>(),
        Err(ChannelError::WouldBlock)
    ));
}

#[test]
fn fake_hub_a_wl_worker_told_to_stop_takes_no_further_chain() {
    // The worker is busy with chain 1 when the guest resets the device; once chain 1 is
    // answered it exits instead of taking chain 2.
    let r = rig(&[named(1, "svc"), named(2, "svc")]);
    let tag = connect_tag(&r.hub);
    let dev = r.dev.clone();
    assert!(returns(move || w(&dev, 0x14, &[0])));
    r.hub
        .send(
            &HubEvent::Refused {
                tag,
                error: Refusal::PermissionDenied,
            },
            &[],
        )
        .unwrap();
    match r.hub.recv::<VmRequest>().unwrap().0 {
        VmRequest::Hello => {}
        other => panic!("the stopped worker went on to another chain: {other:?}"),
    }
}

#[test]
fn fake_hub_a_bar_move_never_waits_for_a_busy_wl_worker() {
    let r = rig(&[named(1, "svc"), alloc(2, 4096)]);
    let mut bus = PciBus::new(Arc::new(Bus::new()));
    let slot = usize::from(bus.add_device(r.dev.clone()).unwrap());
    let bus = Arc::new(Mutex::new(bus));
    let tag = connect_tag(&r.hub);
    // While the worker waits for the hub, the guest moves BAR 2 (the shared-memory window)
    // through config space: the bus applies it under its lock and the device's.
    let new_base: u64 = 0x20_0000_0000;
    let b = bus.clone();
    assert!(
        returns(move || {
            let bus = b.lock().unwrap();
            bus.config_write(slot, 0, 7, 0, &((new_base >> 32) as u32).to_le_bytes());
        }),
        "the BAR move waited for the worker"
    );
    // Chain 1 is answered; chain 2 allocates from the hub's memfd server (this test) and
    // is mapped at the window's new place.
    r.hub
        .send(
            &HubEvent::Refused {
                tag,
                error: Refusal::PermissionDenied,
            },
            &[],
        )
        .unwrap();
    let (tag, size) = match r.hub.recv::<VmRequest>().unwrap().0 {
        VmRequest::AllocShm { tag, size } => (tag, size),
        other => panic!("expected AllocShm, got {other:?}"),
    };
    // SAFETY: a static name; the returned fd is new and owned here.
    let fd = unsafe { libc::memfd_create(c"shm".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(size)
        .unwrap();
    r.hub
        .send(&HubEvent::ShmAllocated { tag, size }, &[fd.as_fd()])
        .unwrap();
    for _ in 0..20_000 {
        if r.out.used().idx().load() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.out.used().idx().load(), 2);
    let code: u32 = r.mem.read_obj(GuestAddress(RESPS + 0x100)).unwrap();
    assert_eq!(code, RESP_VFD_NEW);
    let pfn: u64 = r.mem.read_obj(GuestAddress(RESPS + 0x100 + 16)).unwrap();
    assert!(
        (new_base >> 12..(new_base + (4 << 30)) >> 12).contains(&pfn),
        "pfn {pfn:#x} is in the moved window"
    );
}
