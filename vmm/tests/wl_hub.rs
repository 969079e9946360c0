//! The virtio_wl device's hub side (`--hub-fd`) against a REAL hub (`bulkhead_ipc::hub::Hub`,
//! run in-process on a thread with its VM channels, policy files and audit log, exactly as
//! the `bulkhead-hub` binary builds it). Devices run on mock queues in guest memory with real
//! KVM memory slots; the peer VMs are this test speaking the hub protocol (`Channel`,
//! `HubConn`). Tests whose "hub" is a bare socketpair say so in their name (`fake_hub_`):
//! they inject faults (a hub that is gone, one that answers late).

mod common;
use common::hub::TestHub;
mod wl_rig;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
use bulkhead_ipc::hub::protocol::{FdInfo, HubEvent, Name, VmRequest};
use bulkhead_policy::{FdType, Rights};
use bulkhead_vmm::devices::virtio::wl::device::{Wl, IN_QUEUE, OUT_QUEUE};
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSocket;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm::devices::virtio::{
    Activation, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use wl_rig::{alloc, close, named, send, Dev};

const POLICY: &str = "version 1
grant prov provide svc c2s=memfd:rw+transfer+dup,pipe:r s2c=memfd:rw+transfer+dup max-fds=8
grant peer connect svc@prov
grant peer provide rosvc s2c=memfd:ro max-fds=8
grant client connect rosvc@peer
grant @any quota shm=1MiB shm-count=16 vfds=64
";

fn name(s: &str) -> Name {
    Name::try_from(s).unwrap()
}

fn hang_guard(ch: &Channel) {
    let tv = libc::timeval {
        tv_sec: 20,
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

/// A device whose VMM talks to the hub over `chan` (Hello sent).
fn device(chan: Channel) -> Dev {
    let mut d = Dev::new();
    let link = HubLink::new(chan.into_fd(), d.sockets.clone()).unwrap();
    d.st.set_hub(link);
    d
}

/// A sealed memfd of `size` bytes holding `text` at offset 0 (the hub passes sealed ones).
fn sealed_memfd(size: u64, text: &[u8]) -> OwnedFd {
    // SAFETY: a static name; the returned fd is new and owned here.
    let fd = unsafe {
        libc::memfd_create(
            c"peer".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a memfd we own: the mode a VMM gives its memfds (the hub refuses
    // group/other-writable ones).
    assert_eq!(unsafe { libc::fchmod(fd.as_raw_fd(), 0o644) }, 0);
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.set_len(size).unwrap();
    f.write_all(text).unwrap();
    // SAFETY: F_ADD_SEALS on a memfd we own.
    let r = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK,
        )
    };
    assert_eq!(r, 0);
    fd
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: room for two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two new fds owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn read_at(fd: BorrowedFd<'_>, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

fn write_at(fd: BorrowedFd<'_>, text: &[u8]) {
    let mut f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(text).unwrap();
}

fn key(fd: BorrowedFd<'_>) -> (u64, u64) {
    // SAFETY: fstat into a zeroed stat on an open fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    (st.st_dev, st.st_ino)
}

/// The next event on a peer connection (hang guard 20 s).
fn conn_recv(c: &mut HubConn) -> Result<Incoming, ClientError> {
    for _ in 0..20_000 {
        match c.try_recv() {
            Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            r => return r,
        }
    }
    panic!("nothing arrived on the connection");
}

/// The next message on a peer connection (the verdicts on the peer's own sends, and
/// `Ready`, are passed over).
fn message(c: &mut HubConn) -> (Vec<u8>, Vec<(OwnedFd, FdInfo)>) {
    loop {
        match conn_recv(c).unwrap() {
            Incoming::Message { data, fds } => return (data, fds),
            Incoming::Accepted { .. } | Incoming::Ready => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

fn vfd_new_of(m: &InMessage) -> VfdNew {
    match m {
        InMessage::VfdNew(v) => *v,
        other => panic!("expected VFD_NEW, got {other:?}"),
    }
}

#[test]
fn provider_device_faux_accepts_a_peer_and_exchanges_data_and_memfds_both_ways() {
    let (hub, mut chans) = TestHub::start(POLICY, &["prov", "peer"], 64);
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    let mut prov = device(chans.pop().unwrap());

    // The provider guest listens (bulkhead-wl: Listener::bind(&wl, "listen:svc")).
    let l = prov.new_vfd(&named(1, "listen:svc"));
    assert_eq!(l.flags, VFD_READ | VFD_WRITE);
    // It only carries names to the guest; writing to it is an error, not a stall.
    assert_eq!(prov.code(&send(1, &[], b"x")), RESP_ERR);

    // The peer VM connects to svc@prov.
    peer.send(
        &VmRequest::Connect {
            tag: 9,
            service: name("svc"),
            provider: Some(name("prov")),
        },
        &[],
    )
    .unwrap();
    let (ev, mut fds) = peer.recv::<HubEvent>().unwrap();
    let HubEvent::Connected { tag: 9, conn } = ev else {
        panic!("{ev:?}")
    };
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();

    // The provider guest reads the connection's name on its listener context...
    prov.pump_until(1);
    let wl_name = format!("wl-conn-{conn}");
    assert_eq!(
        prov.drain_in(4),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: format!("{wl_name}\n").into_bytes()
        }]
    );
    // ...and connects to it: its accept(2).
    let c = prov.new_vfd(&named(2, &wl_name));
    assert_eq!(c.flags, VFD_READ | VFD_WRITE);
    assert_eq!(
        prov.code(&named(3, &wl_name)),
        RESP_ERR,
        "the name was consumed"
    );

    // Guest → peer: data, then a guest-allocated buffer.
    assert_eq!(prov.code(&send(2, &[], b"ping")), RESP_OK);
    let (data, fds) = message(&mut pc);
    assert_eq!((data.as_slice(), fds.len()), (&b"ping"[..], 0));
    prov.new_vfd(&alloc(4, 4096));
    assert_eq!(prov.code(&send(2, &[4], b"buffer")), RESP_OK);
    let (data, mut fds) = message(&mut pc);
    assert_eq!(data, b"buffer");
    assert_eq!(fds.len(), 1);
    let (pfd, info) = fds.pop().unwrap();
    assert_eq!(info.fd_type, FdType::Memfd);
    assert!(info
        .rights
        .contains(Rights::READ.union(Rights::WRITE).union(Rights::MAP)));
    // One object: what the peer writes, the provider's buffer holds.
    assert_eq!(key(pfd.as_fd()), key(prov.st.host_fd(4).unwrap()));
    write_at(pfd.as_fd(), b"written by peer");
    assert_eq!(read_at(prov.st.host_fd(4).unwrap(), 15), b"written by peer");

    // An empty frame is not delivered (an empty RECV would read as EOF in the guest), and
    // an empty guest send sends nothing.
    pc.try_send(b"", &[]).unwrap();
    assert_eq!(prov.code(&send(2, &[], b"")), RESP_OK);
    // Peer → guest: a sealed memfd, typed and limited by the hub's FdInfo.
    let m = sealed_memfd(8192, b"from the peer");
    pc.try_send(
        b"pong",
        &[(
            m.as_fd(),
            Rights::READ.union(Rights::WRITE).union(Rights::MAP),
        )],
    )
    .unwrap();
    prov.pump_until(2);
    let msgs = prov.drain_in(4);
    assert_eq!(msgs.len(), 2);
    let v = vfd_new_of(&msgs[0]);
    assert!(v.id & VFD_HOST_ID_BIT != 0);
    assert_eq!(v.size, 8192);
    assert!(v.pfn >= wl_rig::WINDOW >> 12, "mapped in the window");
    assert_eq!(
        msgs[1],
        InMessage::Recv {
            id: 2,
            vfds: vec![v.id],
            data: b"pong".to_vec()
        },
        "VFD_NEW comes before the RECV that carries it"
    );
    assert_eq!(prov.st.shm_writable(v.id), Some(true), "c2s=memfd:rw");
    assert_eq!(
        read_at(prov.st.host_fd(v.id).unwrap(), 13),
        b"from the peer"
    );
    assert_eq!(prov.st.hub_objects(), 1);
    // The guest closes its last vfd for it: the VMM releases it at the hub.
    assert_eq!(prov.code(&close(v.id)), RESP_OK);
    assert_eq!(prov.st.hub_objects(), 0);

    // Peer → guest: a pipe read end (c2s allows pipe:r); the direction is the hub's word.
    let (pr, pw) = pipe();
    pc.try_send(b"pipe", &[(pr.as_fd(), Rights::READ)]).unwrap();
    drop(pr);
    prov.pump_until(2);
    let msgs = prov.drain_in(4);
    let p = vfd_new_of(&msgs[0]);
    assert_eq!(p.flags, VFD_READ, "the guest reads a read end");
    assert_eq!(
        msgs[1],
        InMessage::Recv {
            id: 2,
            vfds: vec![p.id],
            data: b"pipe".to_vec()
        }
    );
    let mut w = std::fs::File::from(pw);
    w.write_all(b"through").unwrap();
    drop(w);
    prov.pump_until(2);
    assert_eq!(
        prov.drain_in(4),
        vec![
            InMessage::Recv {
                id: p.id,
                vfds: vec![],
                data: b"through".to_vec()
            },
            InMessage::Hup { id: p.id }
        ]
    );

    // HUP when the peer closes.
    drop(pc);
    prov.pump_until(1);
    assert_eq!(prov.drain_in(2), vec![InMessage::Hup { id: 2 }]);
    assert!(hub.audit().contains("\"verb\":\"provide\""));

    drop(peer);
    drop(prov);
    hub.join();
}

/// A guest that opens and closes `listen:svc` contexts in a loop. Closing the vfd drops the
/// listener with the VMM's end of its socketpair, and only the first `listen:svc` asks the
/// hub (the VM stays the service's provider until it says Hello again; the hub has no
/// "unprovide"), so neither the VMM's fds nor the hub's audit log grow with the loop. A
/// listener opened after the loop still gets the faux accept.
#[test]
fn listen_contexts_closed_in_a_loop_leave_no_listener_and_one_audit_record() {
    let (hub, mut chans) = TestHub::start(POLICY, &["prov", "peer"], 64);
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    let mut prov = device(chans.pop().unwrap());
    for _ in 0..100 {
        prov.new_vfd(&named(1, "listen:svc"));
        assert_eq!(prov.code(&close(1)), RESP_OK);
    }
    assert_eq!(prov.st.hub().unwrap().listener_count(), 0);
    let provides = |audit: &str| {
        audit
            .lines()
            .filter(|l| l.contains("\"src\":\"prov\"") && l.contains("\"verb\":\"provide\""))
            .count()
    };
    assert_eq!(provides(&hub.audit()), 1, "{}", hub.audit());

    // Still the provider: a listener opened now gets the next connection's name.
    prov.new_vfd(&named(1, "listen:svc"));
    assert_eq!(prov.st.hub().unwrap().listener_count(), 1);
    peer.send(
        &VmRequest::Connect {
            tag: 9,
            service: name("svc"),
            provider: Some(name("prov")),
        },
        &[],
    )
    .unwrap();
    let (ev, _fds) = peer.recv::<HubEvent>().unwrap();
    let HubEvent::Connected { tag: 9, conn } = ev else {
        panic!("{ev:?}")
    };
    prov.pump_until(1);
    assert_eq!(
        prov.drain_in(4),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: format!("wl-conn-{conn}\n").into_bytes()
        }]
    );
    assert_eq!(provides(&hub.audit()), 1);
    // A device reset (Hello) forgets the registration: the next listen: asks again.
    prov.st.clear();
    assert_eq!(prov.st.hub().unwrap().listener_count(), 0);
    prov.new_vfd(&named(1, "listen:svc"));
    assert_eq!(provides(&hub.audit()), 2);

    drop(peer);
    drop(prov);
    hub.join();
}

#[test]
fn refused_connects_get_the_unknown_name_error_and_the_audit_says_why() {
    let (hub, mut chans) = TestHub::start(POLICY, &["prov", "stranger"], 64);
    let mut stranger = device(chans.pop().unwrap());
    let prov = chans.pop().unwrap();
    hang_guard(&prov);
    prov.send(
        &VmRequest::Provide {
            tag: 1,
            service: name("svc"),
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        prov.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    );

    // No grant, no such service, and an unknown local name all look the same.
    assert_eq!(stranger.code(&named(1, "svc@prov")), RESP_ERR);
    assert_eq!(stranger.code(&named(2, "svc")), RESP_ERR);
    assert_eq!(stranger.code(&named(3, "nosuch")), RESP_ERR);
    // Providing without a grant, and names that are no service, too.
    assert_eq!(stranger.code(&named(4, "listen:svc")), RESP_ERR);
    assert_eq!(stranger.code(&named(5, "a@b@c")), RESP_ERR);
    assert_eq!(stranger.st.vfd_count(), 0);

    // The host audit log says who, what, and that it was denied.
    let audit = hub.audit();
    let line = audit
        .lines()
        .find(|l| l.contains("\"src\":\"stranger\"") && l.contains("\"obj\":\"svc@prov\""))
        .unwrap_or_else(|| panic!("no audit record for the connect:\n{audit}"));
    assert!(line.contains("\"verb\":\"connect\""), "{line}");
    assert!(line.contains("\"allowed\":false"), "{line}");
    assert!(line.contains("\"reason\":\""), "{line}");
    assert!(audit.lines().any(|l| l.contains("\"src\":\"stranger\"")
        && l.contains("\"verb\":\"provide\"")
        && l.contains("\"allowed\":false")));

    drop(prov);
    drop(stranger);
    hub.join();
}

#[test]
fn a_read_only_grant_gives_the_guest_a_read_only_buffer() {
    let (hub, mut chans) = TestHub::start(POLICY, &["peer", "client"], 64);
    let mut client = device(chans.pop().unwrap());
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    peer.send(
        &VmRequest::Provide {
            tag: 1,
            service: name("rosvc"),
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        peer.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    );

    // bulkhead-wl: Wl::connect("rosvc@peer").
    let c = client.new_vfd(&named(1, "rosvc@peer"));
    assert_eq!(c.flags, VFD_READ | VFD_WRITE);
    let (ev, mut fds) = peer.recv::<HubEvent>().unwrap();
    assert!(matches!(ev, HubEvent::Accept { .. }), "{ev:?}");
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();

    // The peer offers a writable memfd; the contract is memfd:ro.
    let m = sealed_memfd(4096, b"read me");
    pc.try_send(
        b"here",
        &[(
            m.as_fd(),
            Rights::READ.union(Rights::WRITE).union(Rights::MAP),
        )],
    )
    .unwrap();
    client.pump_until(2);
    let msgs = client.drain_in(4);
    let v = vfd_new_of(&msgs[0]);
    assert_eq!(
        msgs[1],
        InMessage::Recv {
            id: 1,
            vfds: vec![v.id],
            data: b"here".to_vec()
        }
    );
    assert_eq!(
        client.st.shm_writable(v.id),
        Some(false),
        "mapped read-only"
    );
    let rights = client.st.hub_rights(v.id).unwrap();
    assert!(rights.contains(Rights::READ.union(Rights::MAP)));
    assert!(!rights.contains(Rights::WRITE));
    // The kernel enforces it too: the description the hub delivered is O_RDONLY.
    let fd = client.st.host_fd(v.id).unwrap();
    // SAFETY: F_GETFL on an open fd.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    assert_eq!(read_at(fd, 7), b"read me");

    // Sending a pipe read end c2s is outside the contract: the hub refuses the send whole,
    // and the guest's SEND gets the hub's verdict, the uniform error (never OK); its pipe is
    // not hung up (the VMM still holds the read end for a later send), the peer gets
    // nothing, and the connection still works.
    client.new_vfd(&wl_rig::vfd_new(CMD_VFD_NEW_PIPE, 2, VFD_WRITE, 0, ""));
    assert_eq!(client.code(&send(1, &[2], b"nope")), RESP_ERR);
    assert!(
        client.st.host_fd(2).is_some(),
        "a refused send dropped the pipe's far end"
    );
    client.pump_until(0);
    pc.try_send(b"still here", &[]).unwrap();
    client.pump_until(1);
    assert_eq!(
        client.drain_in(2),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: b"still here".to_vec()
        }]
    );

    drop(pc);
    client.pump_until(1);
    assert_eq!(client.drain_in(2), vec![InMessage::Hup { id: 1 }]);
    drop(peer);
    drop(client);
    hub.join();
}

/// A hub frame whose fds do not all fit the device's limits is dropped whole: the guest
/// sees none of it (no VFD_NEW, no VFD_RECV, not a message with fewer vfds), and the device
/// releases every object of it to the hub, whose count of the VM's entries (its `vfds`
/// quota, 2 here) stays right: the next frame with two new objects is delivered.
#[test]
fn a_hub_frame_that_does_not_fit_the_limits_is_dropped_whole_and_released() {
    let policy = "version 1
grant peer provide rosvc s2c=memfd:ro,pipe:w max-fds=8
grant client connect rosvc@peer
grant @any quota shm=1MiB shm-count=16 vfds=64
grant client quota vfds=2
";
    let (hub, mut chans) = TestHub::start(policy, &["peer", "client"], 64);
    let limits = WlLimits {
        max_shm_count: 1,
        ..WlLimits::default()
    };
    let mut client = Dev::with(limits, VIRTIO_WL_F_TRANS_FLAGS);
    let link = HubLink::new(chans.pop().unwrap().into_fd(), client.sockets.clone()).unwrap();
    client.st.set_hub(link);
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    peer.send(
        &VmRequest::Provide {
            tag: 1,
            service: name("rosvc"),
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        peer.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    );
    client.new_vfd(&named(1, "rosvc@peer"));
    let (ev, mut fds) = peer.recv::<HubEvent>().unwrap();
    assert!(matches!(ev, HubEvent::Accept { .. }), "{ev:?}");
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();
    let ro = Rights::READ.union(Rights::MAP);

    // Two buffers; the device maps one at most.
    let (m1, m2) = (sealed_memfd(4096, b"one"), sealed_memfd(4096, b"two"));
    pc.try_send(b"two buffers", &[(m1.as_fd(), ro), (m2.as_fd(), ro)])
        .unwrap();
    pc.try_send(b"after", &[]).unwrap();
    client.pump_until(1);
    assert_eq!(
        client.drain_in(4),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: b"after".to_vec()
        }],
        "the frame that did not fit left nothing"
    );
    assert_eq!((client.st.vfd_count(), client.st.shm_usage()), (1, (0, 0)));
    assert_eq!(client.st.hub_objects(), 0);

    // A round trip on the VM channel (another connect): the hub has the releases by then.
    client.new_vfd(&named(2, "rosvc@peer"));
    let (ev, _conn2) = peer.recv::<HubEvent>().unwrap();
    assert!(matches!(ev, HubEvent::Accept { .. }), "{ev:?}");
    // Two new objects against vfds=2: only fits if the two dropped ones were released.
    let m3 = sealed_memfd(4096, b"three");
    let (_r, w) = pipe();
    pc.try_send(b"fits", &[(m3.as_fd(), ro), (w.as_fd(), Rights::WRITE)])
        .unwrap();
    client.pump_until(3);
    let msgs = client.drain_in(4);
    assert_eq!(msgs.len(), 3, "{msgs:?}");
    let (a, b) = (vfd_new_of(&msgs[0]), vfd_new_of(&msgs[1]));
    assert_eq!(
        msgs[2],
        InMessage::Recv {
            id: 1,
            vfds: vec![a.id, b.id],
            data: b"fits".to_vec()
        }
    );
    assert_eq!(read_at(client.st.host_fd(a.id).unwrap(), 5), b"three");

    drop(pc);
    drop(peer);
    drop(client);
    hub.join();
}

/// A guest SEND larger than one frame goes to the hub in parts, and is delivered whole or
/// not at all: a good one arrives complete and in order (its fd with the first part), and
/// the guest's OK comes from the hub's verdict; one the hub refuses (its fd is outside the
/// contract) is the guest's error, and the peer gets none of its parts.
#[test]
fn a_split_send_is_delivered_whole_or_not_at_all() {
    let (hub, mut chans) = TestHub::start(POLICY, &["prov", "peer"], 64);
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    let mut prov = device(chans.pop().unwrap());
    prov.new_vfd(&named(1, "listen:svc"));
    peer.send(
        &VmRequest::Connect {
            tag: 9,
            service: name("svc"),
            provider: Some(name("prov")),
        },
        &[],
    )
    .unwrap();
    let (ev, mut fds) = peer.recv::<HubEvent>().unwrap();
    assert!(matches!(ev, HubEvent::Connected { .. }), "{ev:?}");
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();
    prov.pump_until(1);
    let line = match prov.drain_in(4).pop() {
        Some(InMessage::Recv { data, .. }) => String::from_utf8(data).unwrap(),
        other => panic!("{other:?}"),
    };
    let c = prov.new_vfd(&named(2, line.trim_end()));
    assert_eq!(c.flags, VFD_READ | VFD_WRITE);

    // 150 000 bytes and a buffer of the guest's own: three parts.
    let big: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let shm = prov.new_vfd(&alloc(3, 4096));
    assert_eq!(prov.code(&send(2, &[shm.id], &big)), RESP_OK);
    let mut got = Vec::new();
    let mut nfds = 0;
    while got.len() < big.len() {
        let (d, f) = message(&mut pc);
        nfds += f.len();
        got.extend(d);
    }
    assert_eq!((got == big, nfds), (true, 1));

    // The same with a pipe's read end, which s2c does not allow: refused whole.
    prov.new_vfd(&wl_rig::vfd_new(CMD_VFD_NEW_PIPE, 4, VFD_WRITE, 0, ""));
    assert_eq!(prov.code(&send(2, &[4], &big)), RESP_ERR);
    assert!(prov.st.host_fd(4).is_some(), "the refused pipe was hung up");
    // A small send after it is the next thing the peer sees: no part of the refused one.
    assert_eq!(prov.code(&send(2, &[], b"next")), RESP_OK);
    let (d, f) = message(&mut pc);
    assert_eq!((d, f.len()), (b"next".to_vec(), 0));
    drop(pc);
    drop(peer);
    drop(prov);
    hub.join();
}

/// A socket another VM passes arrives as a hub vfd, not as that socket: the guest's sends
/// on it are checked by the hub under the grant's socket rights (here send and recv, no
/// send-fds): data reaches the socket's peer, a send with a buffer is the guest's error and
/// the peer gets nothing, and what the peer writes comes back as VFD_RECV.
#[test]
fn a_socket_from_another_vm_is_mediated_by_the_hub() {
    let policy = "version 1
grant peer provide sock s2c=socket:send+recv max-fds=8
grant client connect sock@peer
grant @any quota shm=1MiB shm-count=16 vfds=64
";
    let (hub, mut chans) = TestHub::start(policy, &["peer", "client"], 64);
    let mut client = device(chans.pop().unwrap());
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    peer.send(
        &VmRequest::Provide {
            tag: 1,
            service: name("sock"),
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        peer.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    );
    client.new_vfd(&named(1, "sock@peer"));
    let (ev, mut fds) = peer.recv::<HubEvent>().unwrap();
    assert!(matches!(ev, HubEvent::Accept { .. }), "{ev:?}");
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();
    let (x, p) = std::os::unix::net::UnixStream::pair().unwrap();
    pc.try_send(
        b"take this",
        &[(x.as_fd(), Rights::SEND.union(Rights::RECV))],
    )
    .unwrap();
    client.pump_until(2);
    let msgs = client.drain_in(4);
    let v = vfd_new_of(&msgs[0]);
    assert!(
        client.st.host_fd(v.id).is_none(),
        "the guest's vfd is a hub connection (never passed on), not the socket"
    );
    let shm = client.new_vfd(&alloc(2, 4096));
    assert_eq!(client.code(&send(v.id, &[shm.id], b"with fd")), RESP_ERR);
    assert_eq!(client.code(&send(v.id, &[], b"plain")), RESP_OK);
    let mut got = [0u8; 5];
    (&p).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"plain");
    (&p).write_all(b"back").unwrap();
    client.pump_until(1);
    assert_eq!(
        client.drain_in(2),
        vec![InMessage::Recv {
            id: v.id,
            vfds: vec![],
            data: b"back".to_vec()
        }]
    );
    drop((pc, peer, client, x, p));
    hub.join();
}

#[test]
fn back_pressure_from_a_peer_that_never_reads_answers_out_of_memory() {
    let (hub, mut chans) = TestHub::start(POLICY, &["peer", "client"], 1);
    let mut client = device(chans.pop().unwrap());
    client.st.set_send_wait(Duration::from_millis(20));
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    peer.send(
        &VmRequest::Provide {
            tag: 1,
            service: name("rosvc"),
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        peer.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    );
    client.new_vfd(&named(1, "rosvc@peer"));
    let (_, mut fds) = peer.recv::<HubEvent>().unwrap();
    let mut pc = HubConn::from_fd(fds.pop().unwrap()).unwrap();

    // rosvc's c2s is none for fds, but data flows; the peer never reads.
    let chunk = vec![7u8; 60 * 1024];
    let mut sent = 0;
    let mut code = RESP_OK;
    for _ in 0..1000 {
        code = client.code(&send(1, &[], &chunk));
        if code != RESP_OK {
            break;
        }
        sent += 1;
    }
    assert_eq!(
        code, RESP_OUT_OF_MEMORY,
        "back-pressure after {sent} frames"
    );
    assert!(sent > 0);
    // The peer drains; everything that was answered OK arrives, and sending works again.
    let mut got = 0;
    while got < sent {
        let (d, _) = message(&mut pc);
        assert_eq!(d.len(), chunk.len());
        got += 1;
    }
    let mut ok = false;
    for _ in 0..20_000 {
        if client.code(&send(1, &[], b"again")) == RESP_OK {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(ok);
    drop(pc);
    drop(peer);
    drop(client);
    hub.join();
}

#[test]
fn fake_hub_gone_gives_resp_err_and_local_names_still_work() {
    let (vmm_end, fake_hub) = Channel::pair().unwrap();
    hang_guard(&fake_hub);
    let mut d = device(vmm_end);
    assert_eq!(fake_hub.recv::<VmRequest>().unwrap().0, VmRequest::Hello);
    drop(fake_hub);
    // The worker sees the hang-up on the channel.
    d.st.read_hub();
    assert!(d.st.hub_fd().is_none(), "no longer polled");
    assert_eq!(d.code(&named(1, "svc@prov")), RESP_ERR);
    assert_eq!(d.code(&named(2, "listen:svc")), RESP_ERR);
    let (theirs, _ours) = std::os::unix::net::UnixStream::pair().unwrap();
    d.sockets
        .add("local", WlSocket::NonListening(theirs))
        .unwrap();
    d.new_vfd(&named(3, "local"));
    assert_eq!(d.st.vfd_count(), 1);
}

#[test]
fn fake_hub_that_never_answers_times_out_and_events_during_a_wait_are_handled() {
    let (vmm_end, fake_hub) = Channel::pair().unwrap();
    hang_guard(&fake_hub);
    let mut d = device(vmm_end);
    d.st.hub()
        .unwrap()
        .set_answer_timeout(Duration::from_millis(50));
    assert_eq!(fake_hub.recv::<VmRequest>().unwrap().0, VmRequest::Hello);

    // No answer at all: RESP_ERR once the bounded wait is over.
    assert_eq!(d.code(&named(1, "svc")), RESP_ERR);
    let (req, _) = fake_hub.recv::<VmRequest>().unwrap();
    let VmRequest::Connect { tag: late_tag, .. } = req else {
        panic!("{req:?}")
    };

    // A listener, answered in time by a thread playing the hub; while the next request
    // waits, a faux accept for the listener and the late answer to the first request come
    // first: the accept is announced, the late connection is dropped.
    let fake = std::thread::spawn(move || {
        let (req, _) = fake_hub.recv::<VmRequest>().unwrap();
        let VmRequest::Provide { tag, .. } = req else {
            panic!("{req:?}")
        };
        fake_hub.send(&HubEvent::Provided { tag }, &[]).unwrap();
        let (req, _) = fake_hub.recv::<VmRequest>().unwrap();
        let VmRequest::Connect { tag, .. } = req else {
            panic!("{req:?}")
        };
        let (a, _a_peer) = Channel::pair().unwrap();
        fake_hub
            .send(
                &HubEvent::Accept {
                    service: name("web"),
                    conn: 7,
                    name: name("wl-conn-7"),
                },
                &[a.as_fd()],
            )
            .unwrap();
        let (b, _b_peer) = Channel::pair().unwrap();
        fake_hub
            .send(
                &HubEvent::Connected {
                    tag: late_tag,
                    conn: 3,
                },
                &[b.as_fd()],
            )
            .unwrap();
        fake_hub
            .send(
                &HubEvent::Refused {
                    tag,
                    error: bulkhead_ipc::hub::protocol::Refusal::PermissionDenied,
                },
                &[],
            )
            .unwrap();
        fake_hub
    });
    d.st.hub()
        .unwrap()
        .set_answer_timeout(Duration::from_secs(20));
    d.new_vfd(&named(2, "listen:web"));
    assert_eq!(d.code(&named(3, "other")), RESP_ERR);
    let fake_hub = fake.join().unwrap();
    d.pump_until(1);
    assert_eq!(
        d.drain_in(2),
        vec![InMessage::Recv {
            id: 2,
            vfds: vec![],
            data: b"wl-conn-7\n".to_vec()
        }]
    );
    assert!(d.sockets.contains("wl-conn-7"));
    assert!(!d.sockets.contains("wl-conn-3"));
    // The hub closing an accept the guest never took removes its name.
    fake_hub
        .send(&HubEvent::Closed { tag: 0, conn: 7 }, &[])
        .unwrap();
    for _ in 0..20_000 {
        d.st.read_hub();
        if !d.sockets.contains("wl-conn-7") {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!d.sockets.contains("wl-conn-7"));
}

#[test]
fn a_hub_fd_that_is_not_seqpacket_is_refused() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let err = HubLink::new(OwnedFd::from(a), Dev::new().sockets)
        .err()
        .unwrap();
    assert!(err.to_string().contains("SOCK_SEQPACKET"), "{err}");
}

struct Irq([EventFd; 2]);
impl VirtioInterrupt for Irq {
    fn notify_queue(&self, index: usize) {
        if let Some(e) = self.0.get(index) {
            e.write(1).unwrap();
        }
    }
    fn notify_config(&self) {}
}

#[test]
fn the_worker_thread_polls_the_hub_channel_and_announces_accepts() {
    let (hub, mut chans) = TestHub::start(POLICY, &["prov", "peer"], 64);
    let peer = chans.pop().unwrap();
    hang_guard(&peer);
    let sockets = WlSockets::new();
    let mut wl = Wl::new(sockets.clone(), None, WlLimits::default()).unwrap();
    wl.set_hub(HubLink::new(chans.pop().unwrap().into_fd(), sockets.clone()).unwrap());

    // The guest posts NEW_CTX_NAMED "listen:svc" and four in-queue buffers; then the
    // device is activated and its worker thread does the rest.
    let mem = common::memory();
    mem.write_slice(&named(5, "listen:svc"), GuestAddress(0x20_0000))
        .unwrap();
    let out = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    out.add_desc_chains(
        &common::chain(0, &[(0x20_0000, 64, false), (0x30_0000, 64, true)]),
        0,
    )
    .unwrap();
    let inq = MockSplitQueue::create(&mem, GuestAddress(0x80000), 16);
    let bufs: Vec<RawDescriptor> = (0..4u64)
        .map(|i| {
            RawDescriptor::from(SplitDescriptor::new(
                0x40_0000 + i * 4096,
                4096,
                common::WRITE,
                0,
            ))
        })
        .collect();
    inq.add_desc_chains(&bufs, 0).unwrap();
    let irq = Arc::new(Irq([
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]));
    wl.activate(Activation {
        mem: mem.clone(),
        features: VIRTIO_F_VERSION_1 | VIRTIO_WL_F_TRANS_FLAGS,
        queues: vec![
            ActiveQueue {
                index: IN_QUEUE,
                queue: inq.create_queue().unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActiveQueue {
                index: OUT_QUEUE,
                queue: out.create_queue().unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ],
        interrupt: irq.clone(),
    })
    .unwrap();
    assert!(common::wait_readable(&irq.0[OUT_QUEUE]), "response");
    let resp: u32 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(resp, RESP_VFD_NEW);

    // A peer connects; nobody but the worker touches the device from here.
    peer.send(
        &VmRequest::Connect {
            tag: 1,
            service: name("svc"),
            provider: None,
        },
        &[],
    )
    .unwrap();
    let (ev, _fds) = peer.recv::<HubEvent>().unwrap();
    let HubEvent::Connected { conn, .. } = ev else {
        panic!("{ev:?}")
    };
    assert!(common::wait_readable(&irq.0[IN_QUEUE]), "name announced");
    let e = inq.used().ring().ref_at(0).unwrap().load();
    let mut b = vec![0u8; e.len() as usize];
    mem.read_slice(&mut b, GuestAddress(0x40_0000 + u64::from(e.id()) * 4096))
        .unwrap();
    assert_eq!(
        parse_in_message(&b),
        Some(InMessage::Recv {
            id: 5,
            vfds: vec![],
            data: format!("wl-conn-{conn}\n").into_bytes()
        })
    );
    assert!(sockets.contains(&format!("wl-conn-{conn}")));
    wl.reset();
    drop(wl);
    drop(peer);
    hub.join();
}

/// With a hub, a guest's VFD_NEW is served by the hub's memfd server: charged to the VM
/// against the policy's `quota shm=` (1 MiB here; the device's own limit is 1 GiB), refused
/// past it with OUT_OF_MEMORY and an audit record, and released when the guest closes it.
#[test]
fn guest_allocations_come_from_the_memfd_server_under_the_policy_quota() {
    let (hub, mut chans) = TestHub::start(POLICY, &["client"], 64);
    let mut client = device(chans.pop().unwrap());
    let a = client.new_vfd(&alloc(1, 768 << 10));
    assert_eq!(a.size, 768 << 10);
    // Over the VM's quota: refused by the hub, not by the device.
    assert_eq!(client.code(&alloc(2, 512 << 10)), RESP_OUT_OF_MEMORY);
    let audit = hub.audit();
    let refusal = audit
        .lines()
        .find(|l| l.contains("\"verb\":\"quota\""))
        .unwrap_or_else(|| panic!("no quota record in {audit}"));
    assert!(
        refusal.contains("\"src\":\"client\"") && refusal.contains("\"allowed\":false"),
        "{refusal}"
    );
    // The guest closes the first buffer: its charge goes, and the same request fits.
    assert_eq!(client.code(&close(1)), RESP_OK);
    let b = client.new_vfd(&alloc(3, 512 << 10));
    assert_eq!(b.size, 512 << 10);
    assert_eq!(client.st.shm_writable(3), Some(true));
    drop(client);
    hub.join();
}
