//! virtio_wl with VIRTIO_RING_F_EVENT_IDX, driven like a guest driver over mock queues with
//! the device's real worker thread: the device offers the feature, asks for a notification
//! of every next command (`avail_event` on the out queue follows), does not ask for one when
//! the guest posts in-queue buffers while it has buffers left (one exit less per message
//! received), asks for one as soon as a message waits for a buffer, and then delivers that
//! message when the guest posts one.

mod common;

use common::driver_queue::DriverQueue as Ring;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_vmm::devices::virtio::wl::device::{Wl, IN_QUEUE, OUT_QUEUE};
use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::{WlSocket, WlSockets};
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm::devices::virtio::{
    Activation, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Irq([EventFd; 2]);
impl VirtioInterrupt for Irq {
    fn notify_queue(&self, index: usize) {
        if let Some(e) = self.0.get(index) {
            e.write(1).unwrap();
        }
    }
    fn notify_config(&self) {}
}

const IN_BUFS: u64 = 0x40_0000;

/// Waits (a hang guard, not a timing assertion) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < end, "never: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_device_offers_event_idx() {
    let wl = Wl::new(WlSockets::new(), None, WlLimits::default()).unwrap();
    assert_ne!(wl.features() & VIRTIO_RING_F_EVENT_IDX, 0);
}

#[test]
fn with_event_idx_commands_rearm_and_in_buffers_notify_only_when_a_message_waits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("peer.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let sockets = WlSockets::new();
    sockets.add("peer", WlSocket::Listening(path)).unwrap();
    let mut wl = Wl::new(sockets, None, WlLimits::default()).unwrap();

    // The guest: NEW_CTX_NAMED "peer" posted before activation, one in-queue buffer.
    let mem = common::memory();
    let mut cmd = vec![0u8; 64];
    cmd[..4].copy_from_slice(&CMD_VFD_NEW_CTX_NAMED.to_le_bytes());
    cmd[8..12].copy_from_slice(&5u32.to_le_bytes());
    cmd[28..32].copy_from_slice(b"peer");
    mem.write_slice(&cmd, GuestAddress(0x20_0000)).unwrap();
    let out = Ring::new(&mem, 0x10000);
    out.add(0, &[(0x20_0000, 64, false), (0x30_0000, 64, true)]);
    out.set_used_event(0);
    let inq = Ring::new(&mem, 0x80000);
    inq.add(0, &[(IN_BUFS, 4096, true)]);
    inq.set_used_event(0);
    let irq = Arc::new(Irq([
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]));
    let in_q = inq.queue(true);
    let out_q = out.queue(true);
    let in_notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let in_kick = in_notify.try_clone().unwrap();
    wl.activate(Activation {
        mem: mem.clone(),
        features: VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_WL_F_TRANS_FLAGS,
        queues: vec![
            ActiveQueue {
                index: IN_QUEUE,
                queue: in_q,
                notify: in_notify,
            },
            ActiveQueue {
                index: OUT_QUEUE,
                queue: out_q,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ],
        interrupt: irq.clone(),
    })
    .unwrap();
    assert!(common::wait_readable(&irq.0[OUT_QUEUE]), "response");
    let resp: u32 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(resp, RESP_VFD_NEW);
    // The device wants to hear of the next command (entry 1 of the avail ring).
    eventually("avail_event of the out queue at 1", || {
        out.avail_event() == 1
    });
    let (mut peer, _) = listener.accept().unwrap();

    // A message while a buffer is there: delivered; the in queue's avail_event is not moved
    // (the guest's next post needs no notification).
    peer.write_all(b"one").unwrap();
    assert!(common::wait_readable(&irq.0[IN_QUEUE]), "first message");
    assert_eq!(inq.used_idx(), 1);
    assert_eq!(inq.avail_event(), 0);

    // Another with no buffer left: it waits, and the device asks for the next post.
    peer.write_all(b"two").unwrap();
    eventually("avail_event of the in queue at 1", || {
        inq.avail_event() == 1
    });
    assert_eq!(inq.used_idx(), 1);
    // The guest posts a buffer and notifies (as its driver would, avail_event being 1), and
    // waits for the interrupt of used entry 1.
    inq.set_used_event(1);
    inq.add(1, &[(IN_BUFS + 4096, 4096, true)]);
    in_kick.write(1).unwrap();
    assert!(common::wait_readable(&irq.0[IN_QUEUE]), "second message");
    assert_eq!(inq.used_idx(), 2);
    let (id, len) = inq.used_elem(1);
    assert_eq!(id, 1);
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(IN_BUFS + 4096))
        .unwrap();
    assert_eq!(
        parse_in_message(&b),
        Some(InMessage::Recv {
            id: 5,
            vfds: vec![],
            data: b"two".to_vec()
        })
    );
    wl.reset();
}
