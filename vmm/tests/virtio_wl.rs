//! virtio_wl against virtio-queue's mock queues in guest memory, real host sockets, pipes and
//! memfds, and real KVM memory slots (this machine's /dev/kvm): every command, every error
//! code, ordering of VFD_NEW before the RECV that carries it, HUP on peer close,
//! back-pressure, limits.

mod common;
mod wl_rig;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::scm;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSocket;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use wl_rig::{close, hdr, send, vfd_new, Dev};

const CMD: u64 = 0x20_0000;
const RESP: u64 = 0x30_0000;
use wl_rig::WINDOW;

/// A device (`wl_rig::Dev`) whose registry has a listening host socket under `""` and
/// `wayland`.
struct Rig {
    dev: Dev,
    _dir: tempfile::TempDir,
    listener: UnixListener,
}

impl std::ops::Deref for Rig {
    type Target = Dev;
    fn deref(&self) -> &Dev {
        &self.dev
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Dev {
        &mut self.dev
    }
}

fn rig_with(limits: WlLimits, features: u64) -> Rig {
    let dev = Dev::with(limits, features);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wayland-0");
    let listener = UnixListener::bind(&path).unwrap();
    dev.sockets
        .add("", WlSocket::Listening(path.clone()))
        .unwrap();
    dev.sockets
        .add("wayland", WlSocket::Listening(path))
        .unwrap();
    Rig {
        dev,
        _dir: dir,
        listener,
    }
}

fn rig() -> Rig {
    rig_with(WlLimits::default(), VIRTIO_WL_F_TRANS_FLAGS)
}

impl Rig {
    /// Puts one command (split in two readable descriptors when long enough) and a 64-byte
    /// response buffer on a fresh out queue; returns the response bytes.
    fn submit(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.dev.mem.write_slice(cmd, GuestAddress(CMD)).unwrap();
        self.dev
            .mem
            .write_slice(&[0xaa; 64], GuestAddress(RESP))
            .unwrap();
        let mock = MockSplitQueue::create(&self.dev.mem, GuestAddress(0x10000), 16);
        let split = (cmd.len() / 2) as u32;
        let parts: Vec<(u64, u32, bool)> = if split >= 1 {
            vec![
                (CMD, split, false),
                (CMD + u64::from(split), cmd.len() as u32 - split, false),
                (RESP, 64, true),
            ]
        } else {
            vec![(CMD, cmd.len() as u32, false), (RESP, 64, true)]
        };
        mock.add_desc_chains(&common::chain(0, &parts), 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        assert!(self.dev.st.process_out(&mut q, &self.dev.mem));
        assert_eq!(mock.used().idx().load(), 1);
        let len = mock.used().ring().ref_at(0).unwrap().load().len() as usize;
        let mut out = vec![0u8; len];
        self.dev
            .mem
            .read_slice(&mut out, GuestAddress(RESP))
            .unwrap();
        out
    }

    fn code(&mut self, cmd: &[u8]) -> u32 {
        let r = self.submit(cmd);
        le32(&r, 0).unwrap()
    }

    /// Submits a NEW-type command and returns the VfdNew response.
    fn new_vfd(&mut self, cmd: &[u8]) -> VfdNew {
        let r = self.submit(cmd);
        assert_eq!(le32(&r, 0), Some(RESP_VFD_NEW), "response {r:x?}");
        assert_eq!(r.len(), 32);
        VfdNew {
            id: le32(&r, 8).unwrap(),
            flags: le32(&r, 12).unwrap(),
            pfn: le64(&r, 16).unwrap(),
            size: le32(&r, 24).unwrap(),
        }
    }

    fn connect(&mut self, id: u32, name: &str) -> UnixStream {
        let v = if name.is_empty() {
            self.new_vfd(&vfd_new(CMD_VFD_NEW_CTX, id, VFD_READ | VFD_WRITE, 0, ""))
        } else {
            self.new_vfd(&vfd_new(CMD_VFD_NEW_CTX_NAMED, id, 0, 0, name))
        };
        assert_eq!(v.id, id);
        assert_eq!(v.flags, VFD_READ | VFD_WRITE);
        assert_eq!(v.size, 0);
        self.listener.accept().unwrap().0
    }
}

#[test]
fn alloc_maps_shm_with_absolute_pfns_and_close_frees_it() {
    let mut r = rig();
    let a = r.new_vfd(&vfd_new(CMD_VFD_NEW, 1, 0, 5000, ""));
    assert_eq!(
        (a.id, a.flags, a.size),
        (1, 0, 8192),
        "size is page-aligned up"
    );
    assert!(a.pfn >= WINDOW >> 12 && a.pfn < (WINDOW + (4 << 30)) >> 12);
    let b = r.new_vfd(&vfd_new(CMD_VFD_NEW, 2, 0, 4096, ""));
    assert!(b.pfn >= a.pfn + 2 || b.pfn < a.pfn, "ranges are disjoint");
    assert_eq!(r.dev.st.shm_usage(), (12288, 2));
    assert_eq!(r.code(&close(1)), RESP_OK);
    assert_eq!(r.code(&close(1)), RESP_INVALID_ID);
    assert_eq!(r.dev.st.shm_usage(), (4096, 1));
    // The freed range is reused.
    let c = r.new_vfd(&vfd_new(CMD_VFD_NEW, 3, 0, 8192, ""));
    assert_eq!(c.pfn, a.pfn);
    // Mode 0644: a receiver of another uid can reopen it through /proc/self/fd read-only at
    // most (and the hub, which refuses group/other-writable memfds, passes it).
    let st = nix::sys::stat::fstat(r.dev.st.host_fd(3).unwrap()).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o644);
}

#[test]
fn use_shmem_gives_offsets_and_legacy_flags_are_reported() {
    let mut r = rig_with(
        WlLimits::default(),
        VIRTIO_WL_F_TRANS_FLAGS | VIRTIO_WL_F_USE_SHMEM,
    );
    let a = r.new_vfd(&vfd_new(CMD_VFD_NEW, 1, 0, 4096, ""));
    assert!(a.pfn < (4u64 << 30) >> 12, "an offset into region 0");
    let peer = r.connect(2, "wayland");
    // A vfd without memory has pfn 4 GiB >> 12 in this mode (a host pipe, here).
    let (pr, _pw) = pipe();
    scm::send_with_fds(peer.as_fd(), b"p", &[pr.as_fd()]).unwrap();
    r.dev.st.read_host();
    match r.drain_in(4).first() {
        Some(InMessage::VfdNew(v)) => assert_eq!((v.pfn, v.size), (0x10_0000, 0)),
        other => panic!("{other:?}"),
    }

    let mut legacy = rig_with(WlLimits::default(), 0);
    let s = legacy.new_vfd(&vfd_new(CMD_VFD_NEW, 1, VFD_WRITE | VFD_MAP, 4096, ""));
    assert_eq!(s.flags, VFD_WRITE | VFD_MAP);
    assert!(s.pfn >= WINDOW >> 12);
    let v = legacy.new_vfd(&vfd_new(CMD_VFD_NEW_CTX, 2, 0, 0, ""));
    assert_eq!(v.flags, VFD_CONTROL);
}

#[test]
fn every_error_code() {
    let mut r = rig();
    let _peer = r.connect(1, "");
    r.new_vfd(&vfd_new(CMD_VFD_NEW, 2, 0, 4096, ""));
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 3, VFD_WRITE, 0, ""));
    // RESP_ERR: no socket by that name.
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 4, 0, 0, "nope")),
        RESP_ERR
    );
    // INVALID_ID: in use, host range, zero, unknown send target, unknown vfd in a send.
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, 2, 0, 4096, "")),
        RESP_INVALID_ID
    );
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, VFD_HOST_ID_BIT | 5, 0, 4096, "")),
        RESP_INVALID_ID
    );
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_PIPE, 0, VFD_READ, 0, "")),
        RESP_INVALID_ID
    );
    assert_eq!(r.code(&send(99, &[], b"x")), RESP_INVALID_ID);
    assert_eq!(r.code(&send(1, &[99], b"x")), RESP_INVALID_ID);
    // INVALID_TYPE: sending on shm, fds over a pipe, on a read pipe; non-local foreign ids.
    assert_eq!(r.code(&send(2, &[], b"x")), RESP_INVALID_TYPE);
    assert_eq!(r.code(&send(3, &[2], b"x")), RESP_INVALID_TYPE);
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 5, VFD_READ, 0, ""));
    assert_eq!(r.code(&send(5, &[], b"x")), RESP_INVALID_TYPE);
    let mut f = hdr(CMD_VFD_SEND_FOREIGN_ID);
    for x in [1u32, 1, 1, 7] {
        f.extend_from_slice(&x.to_le_bytes());
    }
    assert_eq!(r.code(&f), RESP_INVALID_TYPE);
    // INVALID_FLAGS: flags on an alloc with TRANS_FLAGS, a pipe with both or no direction.
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, 6, VFD_WRITE, 4096, "")),
        RESP_INVALID_FLAGS
    );
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_PIPE, 6, VFD_READ | VFD_WRITE, 0, "")),
        RESP_INVALID_FLAGS
    );
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_PIPE, 6, 0, 0, "")),
        RESP_INVALID_FLAGS
    );
    // INVALID_CMD: 29 vfds, short chains, unknown and dmabuf commands.
    let ids: Vec<u32> = (1..=29).collect();
    assert_eq!(r.code(&send(1, &ids, b"x")), RESP_INVALID_CMD);
    assert_eq!(r.code(&send(1, &[], b"")[..10]), RESP_INVALID_CMD);
    assert_eq!(r.code(&hdr(0x1234)), RESP_INVALID_CMD);
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_DMABUF, 6, 0, 0, "")),
        RESP_INVALID_CMD
    );
    // OUT_OF_MEMORY: larger than the shm quota.
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, 6, 0, u32::MAX, "")),
        RESP_OUT_OF_MEMORY
    );
    // None of that changed the table.
    assert_eq!(r.dev.st.vfd_count(), 4);
}

/// NEW_PIPE is answered with the direction the device created, as NEW_CTX is: ChromiumOS's
/// driver takes the vfd file's mode from the answer's flags, so an answer of 0 made a pipe
/// the guest asked to write read-only there (`write(2)` → EBADF). Our driver ignores the
/// answer's flags for pipes, so the answer harms neither.
#[test]
fn new_pipe_is_answered_with_the_direction_the_device_created() {
    let mut r = rig();
    let w = r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 1, VFD_WRITE, 0, ""));
    assert_eq!((w.id, w.flags, w.pfn, w.size), (1, VFD_WRITE, 0, 0));
    let rd = r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 2, VFD_READ, 0, ""));
    assert_eq!((rd.id, rd.flags, rd.pfn, rd.size), (2, VFD_READ, 0, 0));
    // The answer says what the device did: the guest writes vfd 1 (a SEND goes through) and
    // reads vfd 2 (a SEND on it is refused).
    assert_eq!(r.code(&send(1, &[], b"x")), RESP_OK);
    assert_eq!(r.code(&send(2, &[], b"x")), RESP_INVALID_TYPE);
}

#[test]
fn a_chain_outside_guest_memory_is_an_invalid_command() {
    let mut r = rig();
    let mock = MockSplitQueue::create(&r.dev.mem, GuestAddress(0x10000), 16);
    mock.add_desc_chains(
        &common::chain(0, &[(1 << 40, 16, false), (RESP, 64, true)]),
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(r.dev.st.process_out(&mut q, &r.dev.mem));
    let code: u32 = r.dev.mem.read_obj(GuestAddress(RESP)).unwrap();
    assert_eq!(code, RESP_INVALID_CMD);
}

#[test]
fn send_carries_data_shm_and_pipes_to_the_host_socket() {
    let mut r = rig();
    let peer = r.connect(1, "wayland");
    let shm = r.new_vfd(&vfd_new(CMD_VFD_NEW, 2, 0, 4096, ""));
    assert_eq!(shm.size, 4096);
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 3, VFD_WRITE, 0, ""));
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 4, VFD_READ, 0, ""));
    assert_eq!(r.code(&send(1, &[2, 3, 4], b"hello")), RESP_OK);
    let mut buf = [0u8; 64];
    let got = scm::recv_with_fds(peer.as_fd(), &mut buf).unwrap();
    assert_eq!(&buf[..got.len], b"hello");
    assert_eq!(got.fds.len(), 3);
    let mut fds = got.fds.into_iter();
    let (memfd, pipe_from_guest, pipe_to_guest) = (
        fds.next().unwrap(),
        fds.next().unwrap(),
        fds.next().unwrap(),
    );
    // The memfd is the guest's buffer, one page.
    let mut f = std::fs::File::from(memfd);
    assert_eq!(f.metadata().unwrap().len(), 4096);
    f.write_all(b"shared").unwrap();

    // Guest → host pipe: the guest writes, the peer reads, then EOF when the guest closes.
    assert_eq!(r.code(&send(3, &[], b"down the pipe")), RESP_OK);
    let mut p = std::fs::File::from(pipe_from_guest);
    let mut s = [0u8; 13];
    p.read_exact(&mut s).unwrap();
    assert_eq!(&s, b"down the pipe");
    assert_eq!(r.code(&close(3)), RESP_OK);
    let mut rest = Vec::new();
    p.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // Host → guest pipe: the peer writes, the guest gets RECV then HUP when the peer closes.
    let mut w = std::fs::File::from(pipe_to_guest);
    w.write_all(b"up").unwrap();
    drop(w);
    r.dev.st.read_host();
    r.dev.st.read_host();
    let msgs = r.drain_in(8);
    assert_eq!(
        msgs,
        vec![
            InMessage::Recv {
                id: 4,
                vfds: vec![],
                data: b"up".to_vec()
            },
            InMessage::Hup { id: 4 }
        ]
    );
}

#[test]
fn recv_announces_host_vfds_before_the_data_that_carries_them() {
    let mut r = rig();
    let peer = r.connect(1, "");
    // The peer sends a memfd, a pipe read end, a read-only memfd and a socket.
    let mfd = memfd(8192);
    let ro = {
        let m = memfd(4096);
        std::fs::OpenOptions::new()
            .read(true)
            .open(format!("/proc/self/fd/{}", m.as_raw_fd()))
            .unwrap()
    };
    let (pr, _pw) = pipe();
    let (sock, _sock_peer) = UnixStream::pair().unwrap();
    scm::send_with_fds(
        peer.as_fd(),
        b"with fds",
        &[mfd.as_fd(), pr.as_fd(), ro.as_fd(), sock.as_fd()],
    )
    .unwrap();
    assert!(r.dev.st.read_host() >= 5);
    let msgs = r.drain_in(16);
    assert_eq!(msgs.len(), 5);
    let news: Vec<VfdNew> = msgs[..4]
        .iter()
        .map(|m| match m {
            InMessage::VfdNew(v) => *v,
            other => panic!("expected VFD_NEW first, got {other:?}"),
        })
        .collect();
    for v in &news {
        assert!(v.id & VFD_HOST_ID_BIT != 0 && v.id & VFD_ID_INVALID_BIT == 0);
    }
    assert_eq!(news[0].size, 8192);
    assert!(news[0].pfn >= WINDOW >> 12, "shm is mapped in the window");
    assert_eq!((news[1].flags, news[1].pfn, news[1].size), (VFD_READ, 0, 0));
    assert_eq!(news[2].size, 4096, "read-only memfd is shm too");
    assert_eq!(
        r.dev.st.shm_writable(news[0].id),
        Some(true),
        "O_RDWR memfd"
    );
    assert_eq!(
        r.dev.st.shm_writable(news[2].id),
        Some(false),
        "an O_RDONLY memfd is mapped read-only"
    );
    assert_eq!(
        news[3].flags,
        VFD_READ | VFD_WRITE,
        "a socket stays a socket"
    );
    assert_eq!(
        msgs[4],
        InMessage::Recv {
            id: 1,
            vfds: news.iter().map(|v| v.id).collect(),
            data: b"with fds".to_vec()
        }
    );
    assert_eq!(r.dev.st.shm_usage(), (12288, 2));
    // The guest can pass a received vfd on.
    assert_eq!(r.code(&send(1, &[news[0].id], b"back")), RESP_OK);
    let mut b = [0u8; 8];
    let got = scm::recv_with_fds(peer.as_fd(), &mut b).unwrap();
    assert_eq!(got.fds.len(), 1);
}

#[test]
fn large_data_is_split_into_page_sized_recvs() {
    let mut r = rig();
    let mut peer = r.connect(1, "");
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    peer.write_all(&data).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        assert!(r.dev.st.read_host() > 0);
        for m in r.drain_in(4) {
            match m {
                InMessage::Recv { id: 1, vfds, data } => {
                    assert!(vfds.is_empty());
                    assert!(data.len() <= MAX_RECV_DATA);
                    got.extend(data);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(got, data);
}

#[test]
fn hup_when_the_peer_closes_and_close_drops_queued_data() {
    let mut r = rig();
    let peer = r.connect(1, "");
    drop(peer);
    r.dev.st.read_host();
    assert_eq!(r.drain_in(4), vec![InMessage::Hup { id: 1 }]);
    // Hung-up vfds are no longer polled.
    assert!(r.dev.st.watched_fds().is_empty());

    let peer = r.connect(2, "");
    let m = memfd(4096);
    scm::send_with_fds(peer.as_fd(), b"x", &[m.as_fd()]).unwrap();
    r.dev.st.read_host();
    assert_eq!(r.dev.st.pending(), 2);
    assert_eq!(r.dev.st.vfd_count(), 3);
    assert_eq!(r.code(&close(2)), RESP_OK);
    assert_eq!(
        r.dev.st.pending(),
        0,
        "queued data and its host vfds are dropped"
    );
    assert_eq!(r.dev.st.vfd_count(), 1);
    assert_eq!(r.dev.st.shm_usage(), (0, 0));
}

#[test]
fn back_pressure_without_in_buffers() {
    let mut r = rig();
    let mut peer = r.connect(1, "");
    peer.write_all(b"one").unwrap();
    assert_eq!(r.dev.st.read_host(), 1);
    assert!(r.dev.st.backpressured());
    assert!(r.dev.st.watched_fds().is_empty(), "host fds are not polled");
    assert!(r.drain_in(0).is_empty());
    assert_eq!(
        r.dev.st.pending(),
        1,
        "nothing lost while no buffers are posted"
    );
    let msgs = r.drain_in(1);
    assert_eq!(
        msgs,
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: b"one".to_vec()
        }]
    );
    assert!(!r.dev.st.backpressured());
    assert_eq!(r.dev.st.watched_fds().len(), 1);
}

#[test]
fn limits_on_vfds_shm_bytes_and_shm_count() {
    let limits = WlLimits {
        max_vfds: 4,
        max_shm_bytes: 3 * 4096,
        max_shm_count: 2,
    };
    let mut r = rig_with(limits, VIRTIO_WL_F_TRANS_FLAGS);
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, 1, 0, 4 * 4096, "")),
        RESP_OUT_OF_MEMORY,
        "bytes"
    );
    r.new_vfd(&vfd_new(CMD_VFD_NEW, 1, 0, 4096, ""));
    r.new_vfd(&vfd_new(CMD_VFD_NEW, 2, 0, 4096, ""));
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW, 3, 0, 4096, "")),
        RESP_OUT_OF_MEMORY,
        "count"
    );
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 3, VFD_READ, 0, ""));
    let peer = r.connect(4, "");
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_PIPE, 5, VFD_READ, 0, "")),
        RESP_OUT_OF_MEMORY,
        "vfds"
    );
    // Received fds over the limit are dropped; the data still arrives.
    let m = memfd(4096);
    scm::send_with_fds(peer.as_fd(), b"d", &[m.as_fd()]).unwrap();
    r.dev.st.read_host();
    assert_eq!(
        r.drain_in(4),
        vec![InMessage::Recv {
            id: 4,
            vfds: vec![],
            data: b"d".to_vec()
        }]
    );
    assert_eq!(r.dev.st.vfd_count(), 4);
}

#[test]
fn non_listening_sockets_are_consumed_by_one_connect() {
    let mut r = rig();
    let (theirs, mut ours) = UnixStream::pair().unwrap();
    let name = r
        .sockets
        .add("wl-conn-%d", WlSocket::NonListening(theirs))
        .unwrap();
    assert_eq!(name, "wl-conn-0");
    r.new_vfd(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 1, 0, 0, &name));
    assert_eq!(r.code(&send(1, &[], b"over the pair")), RESP_OK);
    let mut b = [0u8; 13];
    ours.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"over the pair");
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 2, 0, 0, &name)),
        RESP_ERR
    );
}

fn memfd(size: u64) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: a static name; the returned fd is new and owned here.
    let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(size)
        .unwrap();
    fd
}

fn pipe() -> (OwnedFd, OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: room for two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two new fds owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn faux_accept_name_over_the_listener_then_connect() {
    let mut r = rig();
    // The server guest's listener context; the accepted end stands for the hub.
    let mut hub_listener_side = r.connect(1, "wayland");
    // A client arrives: the hub adds one end of a socketpair as a non-listening socket.
    let (vm_end, mut hub_end) = UnixStream::pair().unwrap();
    let name = r
        .sockets
        .add("wl-conn-%d", WlSocket::NonListening(vm_end))
        .unwrap();
    hub_listener_side
        .write_all(format!("{name}\n").as_bytes())
        .unwrap();
    r.dev.st.read_host();
    assert_eq!(
        r.drain_in(2),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: b"wl-conn-0\n".to_vec()
        }]
    );
    // The guest library connects to the name it read: accept(2) for the guest.
    let v = r.new_vfd(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 2, 0, 0, &name));
    assert_eq!(v.flags, VFD_READ | VFD_WRITE);
    assert_eq!(r.code(&send(2, &[], b"hi")), RESP_OK);
    let mut b = [0u8; 2];
    hub_end.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hi");
    hub_end.write_all(b"back").unwrap();
    r.dev.st.read_host();
    assert_eq!(
        r.drain_in(2),
        vec![InMessage::Recv {
            id: 2,
            vfds: vec![],
            data: b"back".to_vec()
        }]
    );
    // The connection was consumed; the hub closing its end hangs up the guest's vfd.
    assert_eq!(
        r.code(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 3, 0, 0, &name)),
        RESP_ERR
    );
    drop(hub_end);
    r.dev.st.read_host();
    assert_eq!(r.drain_in(2), vec![InMessage::Hup { id: 2 }]);
}

/// A host peer that never reads must not hold the device: once the socket is full a SEND
/// waits a bounded time and the guest gets OUT_OF_MEMORY with nothing sent, so no byte is
/// lost or doubled, and sends go through again once the peer reads.
#[test]
fn a_host_socket_that_is_not_read_gives_back_pressure_not_a_stuck_device() {
    let _guard =
        HangGuard::new("a_host_socket_that_is_not_read_gives_back_pressure_not_a_stuck_device");
    let mut r = rig();
    r.dev.st.set_send_wait(std::time::Duration::from_millis(20));
    let mut peer = r.connect(1, "wayland");
    let msg = [0x5au8; 64];
    let mut ok = 0usize;
    let code = loop {
        let c = r.code(&send(1, &[], &msg));
        if c != RESP_OK {
            break c;
        }
        ok += 1;
        assert!(ok < 1_000_000, "the socket never filled");
    };
    assert_eq!(code, RESP_OUT_OF_MEMORY);
    assert!(ok > 0);
    // The peer reads everything that was accepted: exactly `ok` messages.
    peer.set_nonblocking(true).unwrap();
    let mut got = 0usize;
    let mut buf = [0u8; 65536];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                assert!(buf[..n].iter().all(|b| *b == 0x5a));
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, ok * msg.len());
    assert_eq!(r.code(&send(1, &[], b"again")), RESP_OK);
    peer.set_nonblocking(false).unwrap();
    let mut again = [0u8; 5];
    peer.read_exact(&mut again).unwrap();
    assert_eq!(&again, b"again");
}

/// The same for a guest-to-host pipe whose reader does not read.
#[test]
fn a_pipe_that_is_not_read_gives_back_pressure_not_a_stuck_device() {
    let _guard = HangGuard::new("a_pipe_that_is_not_read_gives_back_pressure_not_a_stuck_device");
    let mut r = rig();
    r.dev.st.set_send_wait(std::time::Duration::from_millis(20));
    let peer = r.connect(1, "wayland");
    r.new_vfd(&vfd_new(CMD_VFD_NEW_PIPE, 3, VFD_WRITE, 0, ""));
    assert_eq!(r.code(&send(1, &[3], b"p")), RESP_OK);
    let mut buf = [0u8; 8];
    let got = scm::recv_with_fds(peer.as_fd(), &mut buf).unwrap();
    let read_end = got.fds.into_iter().next().unwrap();
    let chunk = [0xa5u8; 4096];
    let mut ok = 0usize;
    let code = loop {
        let c = r.code(&send(3, &[], &chunk));
        if c != RESP_OK {
            break c;
        }
        ok += 1;
        assert!(ok < 100_000, "the pipe never filled");
    };
    assert_eq!(code, RESP_OUT_OF_MEMORY);
    let mut f = std::fs::File::from(read_end);
    let mut all = vec![0u8; ok * chunk.len()];
    f.read_exact(&mut all).unwrap();
    assert!(all.iter().all(|b| *b == 0xa5));
    assert_eq!(r.code(&send(3, &[], b"more")), RESP_OK);
    let mut more = [0u8; 4];
    f.read_exact(&mut more).unwrap();
    assert_eq!(&more, b"more");
}

fn sealing_memfd(size: u64) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: a static name; the returned fd is new and owned here.
    let fd = unsafe {
        libc::memfd_create(
            c"sealed".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(size)
        .unwrap();
    fd
}

/// An O_RDWR memfd with a write seal (F_SEAL_WRITE, or F_SEAL_FUTURE_WRITE) is mapped
/// read-only: a writable shared mapping of it is impossible, and the guest must not get one.
#[test]
fn write_sealed_memfds_from_the_host_are_mapped_read_only() {
    let mut r = rig();
    let peer = r.connect(1, "");
    let plain = sealing_memfd(4096);
    let sealed = sealing_memfd(4096);
    let future = sealing_memfd(8192);
    for (m, seal) in [
        (&sealed, libc::F_SEAL_WRITE),
        (&future, libc::F_SEAL_FUTURE_WRITE),
    ] {
        // SAFETY: F_ADD_SEALS on a memfd created with MFD_ALLOW_SEALING.
        let added = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, seal) };
        assert_eq!(added, 0);
        // SAFETY: F_GETFL on an open fd.
        let fl = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            fl & libc::O_ACCMODE,
            libc::O_RDWR,
            "the description is O_RDWR"
        );
    }
    scm::send_with_fds(
        peer.as_fd(),
        b"sealed",
        &[plain.as_fd(), sealed.as_fd(), future.as_fd()],
    )
    .unwrap();
    r.dev.st.read_host();
    let msgs = r.drain_in(8);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    let ids: Vec<u32> = msgs[..3]
        .iter()
        .map(|m| match m {
            InMessage::VfdNew(v) => v.id,
            other => panic!("expected VFD_NEW, got {other:?}"),
        })
        .collect();
    assert_eq!(r.dev.st.shm_writable(ids[0]), Some(true), "not sealed");
    assert_eq!(r.dev.st.shm_writable(ids[1]), Some(false), "F_SEAL_WRITE");
    assert_eq!(
        r.dev.st.shm_writable(ids[2]),
        Some(false),
        "F_SEAL_FUTURE_WRITE"
    );
    assert_eq!(r.dev.st.shm_usage(), (4 * 4096, 3));
}

/// A memfd from a host socket over the shm byte (or count) limit is refused before anything
/// is mapped: no mmap, no KVM memory slot. The data still arrives.
#[test]
fn an_over_limit_memfd_from_the_host_is_refused_before_it_is_mapped() {
    let limits = WlLimits {
        max_vfds: 16,
        max_shm_bytes: 2 * 4096,
        max_shm_count: 2,
    };
    let mut r = rig_with(limits, VIRTIO_WL_F_TRANS_FLAGS);
    let peer = r.connect(1, "");
    let before = r.dev.st.shm_map_attempts();
    let big = memfd(3 * 4096);
    scm::send_with_fds(peer.as_fd(), b"too big", &[big.as_fd()]).unwrap();
    r.dev.st.read_host();
    assert_eq!(
        r.drain_in(4),
        vec![InMessage::Recv {
            id: 1,
            vfds: vec![],
            data: b"too big".to_vec()
        }]
    );
    assert_eq!(
        r.dev.st.shm_map_attempts(),
        before,
        "never mapped (no memory slot added)"
    );
    assert_eq!(r.dev.st.shm_usage(), (0, 0));
    // Within the limit it is mapped; the count limit refuses the same way.
    let (a, b, c) = (memfd(4096), memfd(4096), memfd(4096));
    scm::send_with_fds(peer.as_fd(), b"3", &[a.as_fd(), b.as_fd(), c.as_fd()]).unwrap();
    r.dev.st.read_host();
    let msgs = r.drain_in(8);
    assert_eq!(msgs.len(), 3, "two VFD_NEW and the RECV: {msgs:?}");
    assert_eq!(r.dev.st.shm_map_attempts(), before + 2);
    assert_eq!(r.dev.st.shm_usage(), (2 * 4096, 2));
}

/// A socket listening at `path` with the smallest backlog, filled: further connects find
/// it full. Returns the listener and the connections that fill it.
fn full_listener(path: &std::path::Path) -> (OwnedFd, Vec<OwnedFd>) {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is valid; family and path are set below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let sock = || {
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        assert!(fd >= 0);
        // SAFETY: a new fd owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let l = sock();
    // SAFETY: bind and listen on our socket with a valid address.
    unsafe {
        assert_eq!(
            libc::bind(l.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len),
            0
        );
        assert_eq!(libc::listen(l.as_raw_fd(), 0), 0);
    }
    let mut filling = Vec::new();
    loop {
        let c = sock();
        // SAFETY: connect our socket to a valid address.
        let r = unsafe { libc::connect(c.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
            break;
        }
        filling.push(c);
        assert!(filling.len() < 1000, "the backlog never filled");
    }
    (l, filling)
}

/// A host listener that accepts nothing (its backlog full) must not hold the device: the
/// connect of NEW_CTX_NAMED waits at most the send wait, then the guest gets RESP_ERR.
/// Without the bound the connect would wait until the guard below accepts one (a hang guard,
/// not a timing assertion) and the guest would get a vfd.
#[test]
fn a_listener_with_a_full_backlog_gives_err_not_a_stuck_device() {
    let mut r = rig();
    r.dev.st.set_send_wait(std::time::Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full");
    let (listener, _filling) = full_listener(&path);
    r.sockets
        .add("full", WlSocket::Listening(path.clone()))
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let guard_fd = listener.try_clone().unwrap();
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(std::time::Duration::from_secs(10)).is_err() {
            // SAFETY: accept(2) on our listener; the new fd is closed at once.
            let c = unsafe {
                libc::accept(
                    guard_fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if c >= 0 {
                // SAFETY: a new fd we own.
                unsafe { libc::close(c) };
            }
        }
    });
    let code = r.code(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 9, 0, 0, "full"));
    let _ = tx.send(());
    guard.join().unwrap();
    assert_eq!(code, RESP_ERR);
    assert_eq!(r.dev.st.vfd_count(), 0);
    assert!(r.sockets.contains("full"), "a listening name stays");
    // Once the listener takes one connection off its backlog, the next connect goes through.
    // SAFETY: accept(2) on our listener (non-blocking; the backlog is not empty).
    let c = unsafe {
        libc::accept(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert!(c >= 0);
    // SAFETY: a new fd we own.
    unsafe { libc::close(c) };
    let v = r.new_vfd(&vfd_new(CMD_VFD_NEW_CTX_NAMED, 9, 0, 0, "full"));
    assert_eq!(v.flags, VFD_READ | VFD_WRITE);
}

/// Only sockets, regular files and FIFOs become vfds: a character device from a host
/// socket is closed (logged) and the data that came with it still arrives.
#[test]
fn a_char_device_from_the_host_is_refused_and_the_data_still_arrives() {
    let mut r = rig();
    let peer = r.connect(1, "");
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap();
    let (pr, _pw) = pipe();
    scm::send_with_fds(peer.as_fd(), b"dev", &[null.as_fd(), pr.as_fd()]).unwrap();
    r.dev.st.read_host();
    let msgs = r.drain_in(8);
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    let InMessage::VfdNew(v) = msgs[0] else {
        panic!("{msgs:?}")
    };
    assert_eq!(
        (v.flags, v.pfn, v.size),
        (VFD_READ, 0, 0),
        "the FIFO is a pipe"
    );
    assert_eq!(
        msgs[1],
        InMessage::Recv {
            id: 1,
            vfds: vec![v.id],
            data: b"dev".to_vec()
        }
    );
    assert_eq!(r.dev.st.vfd_count(), 2, "the context and the pipe only");
}

/// A pipe the device reads may be shared with a peer that reads it too: if the peer drains
/// it between the device's poll and its read, the read must not block the device. Without
/// that, `read_vfd` would wait until the guard below writes (a hang guard, not a timing
/// assertion) and deliver the guard's byte.
#[test]
fn a_pipe_drained_by_someone_else_does_not_block_the_device() {
    let mut r = rig();
    let peer = r.connect(1, "");
    let (pr, pw) = pipe();
    let mut ours = std::fs::File::from(pr.try_clone().unwrap());
    scm::send_with_fds(peer.as_fd(), b"p", &[pr.as_fd()]).unwrap();
    drop(pr);
    r.dev.st.read_host();
    let msgs = r.drain_in(4);
    let InMessage::VfdNew(v) = msgs[0] else {
        panic!("{msgs:?}")
    };
    let mut w = std::fs::File::from(pw);
    w.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    ours.read_exact(&mut b).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut guard_w = w.try_clone().unwrap();
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(std::time::Duration::from_secs(10)).is_err() {
            let _ = guard_w.write_all(b"G");
        }
    });
    r.dev.st.read_vfd(v.id);
    let _ = tx.send(());
    guard.join().unwrap();
    assert_eq!(r.dev.st.pending(), 0, "nothing read, nothing queued");
    // Data is still read when it is there, and the last writer closing is a hang-up.
    w.write_all(b"yz").unwrap();
    r.dev.st.read_vfd(v.id);
    assert_eq!(
        r.drain_in(4),
        vec![InMessage::Recv {
            id: v.id,
            vfds: vec![],
            data: b"yz".to_vec()
        }]
    );
    drop(w);
    r.dev.st.read_vfd(v.id);
    assert_eq!(r.drain_in(4), vec![InMessage::Hup { id: v.id }]);
}

/// A hang guard, not a timing assertion: if a send the device should bound blocks instead,
/// the test would never end; after two minutes the guard says which test hung and aborts
/// the test binary, so the run fails instead of stalling.
struct HangGuard(std::sync::mpsc::Sender<()>);

impl HangGuard {
    fn new(test: &'static str) -> HangGuard {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(std::time::Duration::from_secs(120))
            {
                eprintln!("{test}: hung (a send that should be bounded blocked)");
                std::process::abort();
            }
        });
        HangGuard(tx)
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}
