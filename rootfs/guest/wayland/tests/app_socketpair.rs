//! The app-side proxy on real socketpairs: a client speaking raw Wayland on one end, the
//! "compositor" end of its connection (the stand-in transport: a socketpair, memfds for
//! vfds) on the other. Messages are built from the protocol tables, by name.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bulkhead_wayland::app::session::{self, End};
use bulkhead_wayland::protocol::{interface, message_named};
use bulkhead_wayland::sock;
use bulkhead_wayland::stats::Stats;
use bulkhead_wayland::transport::standin::StandIn;
use bulkhead_wayland::transport::{Acceptor, Channel, Mapping, Transport};
use bulkhead_wayland::wire::{self, Arg};

fn memfd(len: usize) -> OwnedFd {
    // SAFETY: a static NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"client-pool".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd);
    f.set_len(len as u64).unwrap();
    OwnedFd::from(f)
}

fn pwrite(fd: BorrowedFd<'_>, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    f.write_all_at(data, at).unwrap();
}

fn opcode(iface: &str, name: &str, request: bool) -> u16 {
    let i = interface(iface).unwrap();
    message_named(if request { i.requests } else { i.events }, name)
        .unwrap_or_else(|| panic!("{iface}.{name}"))
        .0
}

struct Msg {
    object: u32,
    opcode: u16,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Reader {
    bytes: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Fds per receive, and whether that receive began at a message boundary.
    recvs: Vec<(usize, bool)>,
}

impl Reader {
    fn take(&mut self) -> Option<Msg> {
        let h = wire::header(&self.bytes).unwrap()?;
        if self.bytes.len() < h.size {
            return None;
        }
        let bytes: Vec<u8> = self.bytes.drain(..h.size).collect();
        Some(Msg {
            object: h.object,
            opcode: h.opcode,
            bytes,
        })
    }
}

struct Rig {
    client: UnixStream,
    far: Box<dyn Channel>,
    t: StandIn,
    stats: Arc<Stats>,
    session: Option<JoinHandle<End>>,
    from_far: Reader,
    from_proxy: Reader,
}

fn rig() -> Rig {
    let t = StandIn::new();
    let mut acceptor = t.listen("wayland");
    let (client, proxy_end) = UnixStream::pair().unwrap();
    let near = t.connect("wayland@gui-vm").unwrap();
    let (far, _name) = acceptor.accept().unwrap();
    let stats = Arc::new(Stats::default());
    let (tt, s): (Arc<dyn Transport>, _) = (Arc::new(t.clone()), stats.clone());
    let session = std::thread::spawn(move || session::run(proxy_end, near, tt, s));
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    Rig {
        client,
        far,
        t,
        stats,
        session: Some(session),
        from_far: Reader::default(),
        from_proxy: Reader::default(),
    }
}

impl Rig {
    fn request(
        &self,
        object: u32,
        iface: &str,
        name: &str,
        args: &[Arg<'_>],
        fds: &[BorrowedFd<'_>],
    ) {
        let m = wire::encode(object, opcode(iface, name, true), args);
        sock::send_all(self.client.as_fd(), &m, fds).unwrap();
    }

    fn event(
        &self,
        object: u32,
        iface: &str,
        name: &str,
        args: &[Arg<'_>],
        fds: &[BorrowedFd<'_>],
    ) {
        let m = wire::encode(object, opcode(iface, name, false), args);
        self.far.send(&m, fds).unwrap();
    }

    /// The next message the compositor's end receives.
    fn at_far(&mut self) -> Msg {
        loop {
            if let Some(m) = self.from_far.take() {
                return m;
            }
            let r = sock::poll(&[(self.far.poll_fd(), libc::POLLIN)], 10_000).unwrap();
            assert_ne!(r[0], 0, "nothing reached the compositor's end");
            let boundary = self.from_far.bytes.is_empty();
            let (data, fds) = self.far.recv().unwrap();
            assert!(!data.is_empty() || !fds.is_empty(), "connection closed");
            self.from_far.recvs.push((fds.len(), boundary));
            self.from_far.bytes.extend(data);
            self.from_far.fds.extend(fds);
        }
    }

    /// The next message the client receives; `None` once the proxy closed its socket.
    fn at_client(&mut self) -> Option<Msg> {
        loop {
            if let Some(m) = self.from_proxy.take() {
                return Some(m);
            }
            let mut buf = vec![0u8; 65536];
            let (n, fds) = sock::recv_with_fds(self.client.as_fd(), &mut buf, false).unwrap();
            if n == 0 && fds.is_empty() {
                return None;
            }
            self.from_proxy
                .recvs
                .push((fds.len(), self.from_proxy.bytes.is_empty()));
            self.from_proxy.bytes.extend_from_slice(&buf[..n]);
            self.from_proxy.fds.extend(fds);
        }
    }

    /// wl_display.get_registry, then the compositor announces `globals`.
    fn registry(&mut self, globals: &[(u32, &str, u32)]) -> Vec<String> {
        self.request(1, "wl_display", "get_registry", &[Arg::NewId(2)], &[]);
        assert_eq!(self.at_far().object, 1);
        for (name, iface, v) in globals {
            self.event(
                2,
                "wl_registry",
                "global",
                &[
                    Arg::Uint(*name),
                    Arg::Str(Some(iface.as_bytes())),
                    Arg::Uint(*v),
                ],
                &[],
            );
        }
        // A sync round trip marks the end of the announcements.
        self.request(1, "wl_display", "sync", &[Arg::NewId(3)], &[]);
        assert_eq!(self.at_far().opcode, opcode("wl_display", "sync", true));
        self.event(3, "wl_callback", "done", &[Arg::Uint(0)], &[]);
        self.event(1, "wl_display", "delete_id", &[Arg::Uint(3)], &[]);
        let mut seen = Vec::new();
        loop {
            let m = self.at_client().unwrap();
            if m.object == 3 {
                break;
            }
            let args = wire::parse_args(
                interface("wl_registry").unwrap().events[0].signature,
                &m.bytes[8..],
            )
            .unwrap();
            if let Arg::Str(Some(s)) = args[1] {
                seen.push(String::from_utf8(s.to_vec()).unwrap());
            }
        }
        assert_eq!(self.at_client().unwrap().object, 1, "delete_id");
        seen
    }

    fn bind(&mut self, name: u32, iface: &str, version: u32, id: u32) {
        self.request(
            2,
            "wl_registry",
            "bind",
            &[
                Arg::Uint(name),
                Arg::Str(Some(iface.as_bytes())),
                Arg::Uint(version),
                Arg::NewId(id),
            ],
            &[],
        );
        assert_eq!(self.at_far().object, 2);
    }

    /// The client gets `wl_display.error` with `code`, then its socket is closed.
    fn expect_protocol_error(mut self, code: u32) -> String {
        let m = self.at_client().expect("an error event");
        assert_eq!((m.object, m.opcode), (1, 0), "wl_display.error");
        let args = wire::parse_args(
            interface("wl_display").unwrap().events[0].signature,
            &m.bytes[8..],
        )
        .unwrap();
        assert_eq!(args[1], Arg::Uint(code), "{args:?}");
        assert!(self.at_client().is_none(), "the client is disconnected");
        let end = self.session.take().unwrap().join().unwrap();
        assert!(matches!(end, End::Protocol(_)), "{end:?}");
        match args[2] {
            Arg::Str(Some(s)) => String::from_utf8(s.to_vec()).unwrap(),
            _ => String::new(),
        }
    }
}

const BASIC: &[(u32, &str, u32)] = &[
    (1, "wl_shm", 1),
    (2, "wl_compositor", 4),
    (3, "zwp_linux_dmabuf_v1", 3),
    (4, "wl_drm", 2),
    (5, "weston_screenshooter", 1),
    (6, "wl_seat", 7),
    (7, "wl_data_device_manager", 3),
];

#[test]
fn dmabuf_wl_drm_and_unknown_globals_are_hidden() {
    let mut r = rig();
    let seen = r.registry(BASIC);
    assert_eq!(
        seen,
        [
            "wl_shm",
            "wl_compositor",
            "wl_seat",
            "wl_data_device_manager"
        ]
    );
    // Binding a hidden global by guessing its name is a protocol error.
    r.request(
        2,
        "wl_registry",
        "bind",
        &[
            Arg::Uint(3),
            Arg::Str(Some(b"zwp_linux_dmabuf_v1")),
            Arg::Uint(3),
            Arg::NewId(10),
        ],
        &[],
    );
    let m = r.expect_protocol_error(0);
    assert!(m.contains("invalid global"), "{m}");
}

struct Surface {
    pool_client: OwnedFd,
    vfd_map: Mapping,
}

/// shm + compositor bound; surface 5; a 100x100 XRGB8888 pool 6 and buffer 7 attached.
fn surface_with_buffer(r: &mut Rig) -> Surface {
    r.registry(BASIC);
    r.bind(1, "wl_shm", 1, 3);
    r.bind(2, "wl_compositor", 4, 4);
    r.request(4, "wl_compositor", "create_surface", &[Arg::NewId(5)], &[]);
    r.at_far();
    let pool_client = memfd(40_000);
    pwrite(pool_client.as_fd(), 0, &[0x11; 40_000]);
    r.request(
        3,
        "wl_shm",
        "create_pool",
        &[Arg::NewId(6), Arg::Fd, Arg::Int(40_000)],
        &[pool_client.as_fd()],
    );
    let m = r.at_far();
    assert_eq!(
        (m.object, m.opcode),
        (3, opcode("wl_shm", "create_pool", true))
    );
    let vfd = r
        .from_far
        .fds
        .pop_front()
        .expect("create_pool carries an fd");
    assert!(r.t.is_vfd(vfd.as_fd()), "the compositor gets a vfd");
    let st_vfd = nix::sys::stat::fstat(vfd.as_fd()).unwrap();
    let st_client = nix::sys::stat::fstat(pool_client.as_fd()).unwrap();
    assert_ne!(
        st_vfd.st_ino, st_client.st_ino,
        "not the client's own memory"
    );
    assert!(st_vfd.st_size >= 40_000);
    let vfd_map = Mapping::new_backed(vfd.as_fd(), 40_000, false).unwrap();
    r.request(
        6,
        "wl_shm_pool",
        "create_buffer",
        &[
            Arg::NewId(7),
            Arg::Int(0),
            Arg::Int(100),
            Arg::Int(100),
            Arg::Int(400),
            Arg::Uint(1),
        ],
        &[],
    );
    r.at_far();
    r.request(
        5,
        "wl_surface",
        "attach",
        &[Arg::Object(7), Arg::Int(0), Arg::Int(0)],
        &[],
    );
    r.at_far();
    Surface {
        pool_client,
        vfd_map,
    }
}

fn commit(r: &mut Rig) {
    r.request(5, "wl_surface", "commit", &[], &[]);
    let m = r.at_far();
    assert_eq!(
        (m.object, m.opcode),
        (5, opcode("wl_surface", "commit", true))
    );
}

fn byte(m: &Mapping, at: usize) -> u8 {
    let mut b = [0u8];
    m.read_at(at, &mut b).unwrap();
    b[0]
}

#[test]
fn shm_pool_becomes_shared_memory_and_a_commit_copies_only_the_damaged_rectangle() {
    let mut r = rig();
    let s = surface_with_buffer(&mut r);
    assert_eq!(byte(&s.vfd_map, 0), 0, "nothing copied before a commit");
    r.request(
        5,
        "wl_surface",
        "damage_buffer",
        &[Arg::Int(0), Arg::Int(0), Arg::Int(100), Arg::Int(100)],
        &[],
    );
    r.at_far();
    commit(&mut r);
    assert_eq!(r.stats.copied_bytes.load(Ordering::Relaxed), 40_000);
    assert_eq!(byte(&s.vfd_map, 39_999), 0x11);
    // The client draws a 10x5 rectangle at (20, 30) and damages it, and also changes a
    // pixel it does not damage (a broken client): only the damaged bytes are copied.
    for y in 30..35 {
        pwrite(
            s.pool_client.as_fd(),
            (y * 400 + 20 * 4) as u64,
            &[0x22; 40],
        );
    }
    pwrite(s.pool_client.as_fd(), 0, &[0x33; 4]);
    r.request(
        5,
        "wl_surface",
        "damage_buffer",
        &[Arg::Int(20), Arg::Int(30), Arg::Int(10), Arg::Int(5)],
        &[],
    );
    r.request(
        5,
        "wl_surface",
        "attach",
        &[Arg::Object(7), Arg::Int(0), Arg::Int(0)],
        &[],
    );
    r.at_far();
    r.at_far();
    commit(&mut r);
    assert_eq!(
        r.stats.copied_bytes.load(Ordering::Relaxed),
        40_000 + 10 * 5 * 4
    );
    assert_eq!(r.stats.last_commit_bytes.load(Ordering::Relaxed), 200);
    assert_eq!(byte(&s.vfd_map, 30 * 400 + 20 * 4), 0x22);
    assert_eq!(byte(&s.vfd_map, 34 * 400 + 29 * 4 + 3), 0x22);
    assert_eq!(
        byte(&s.vfd_map, 34 * 400 + 30 * 4),
        0x11,
        "right of the rectangle"
    );
    assert_eq!(byte(&s.vfd_map, 0), 0x11, "undamaged: not copied");
    // Surface damage (wl_surface.damage) at scale 2 is scaled to buffer pixels.
    r.request(5, "wl_surface", "set_buffer_scale", &[Arg::Int(2)], &[]);
    r.request(
        5,
        "wl_surface",
        "damage",
        &[Arg::Int(1), Arg::Int(1), Arg::Int(2), Arg::Int(1)],
        &[],
    );
    r.at_far();
    r.at_far();
    commit(&mut r);
    assert_eq!(r.stats.last_commit_bytes.load(Ordering::Relaxed), 4 * 2 * 4);
}

#[test]
fn a_second_buffer_gets_the_damage_it_missed() {
    let mut r = rig();
    let s = surface_with_buffer(&mut r);
    r.request(
        6,
        "wl_shm_pool",
        "create_buffer",
        &[
            Arg::NewId(8),
            Arg::Int(0),
            Arg::Int(50),
            Arg::Int(50),
            Arg::Int(400),
            Arg::Uint(1),
        ],
        &[],
    );
    r.at_far();
    commit(&mut r); // buffer 7, first time: whole
    r.request(
        5,
        "wl_surface",
        "attach",
        &[Arg::Object(8), Arg::Int(0), Arg::Int(0)],
        &[],
    );
    r.at_far();
    commit(&mut r); // buffer 8, first time: whole (50 rows of 200 bytes)
    assert_eq!(r.stats.last_commit_bytes.load(Ordering::Relaxed), 50 * 200);
    // Damage (0,0,1,1) on 8, then 7 is attached again with damage (2,0,1,1): 7 missed
    // 8's damage, so both pixels are copied into 7.
    r.request(
        5,
        "wl_surface",
        "damage_buffer",
        &[Arg::Int(0), Arg::Int(0), Arg::Int(1), Arg::Int(1)],
        &[],
    );
    r.at_far();
    commit(&mut r);
    r.request(
        5,
        "wl_surface",
        "attach",
        &[Arg::Object(7), Arg::Int(0), Arg::Int(0)],
        &[],
    );
    r.request(
        5,
        "wl_surface",
        "damage_buffer",
        &[Arg::Int(2), Arg::Int(0), Arg::Int(1), Arg::Int(1)],
        &[],
    );
    r.at_far();
    r.at_far();
    commit(&mut r);
    assert_eq!(r.stats.last_commit_bytes.load(Ordering::Relaxed), 8);
    drop(s);
}

#[test]
fn pool_resize_makes_new_shared_memory_under_the_same_id_and_hides_its_delete_id() {
    let mut r = rig();
    let s = surface_with_buffer(&mut r);
    std::fs::File::from(s.pool_client.try_clone().unwrap())
        .set_len(80_000)
        .unwrap();
    r.request(6, "wl_shm_pool", "resize", &[Arg::Int(80_000)], &[]);
    let d = r.at_far();
    assert_eq!(
        (d.object, d.opcode),
        (6, opcode("wl_shm_pool", "destroy", true))
    );
    let c = r.at_far();
    assert_eq!(
        (c.object, c.opcode),
        (3, opcode("wl_shm", "create_pool", true))
    );
    let args = wire::parse_args(
        interface("wl_shm").unwrap().requests[0].signature,
        &c.bytes[8..],
    )
    .unwrap();
    assert_eq!(args, [Arg::NewId(6), Arg::Fd, Arg::Int(80_000)]);
    let vfd = r.from_far.fds.pop_front().unwrap();
    assert!(nix::sys::stat::fstat(vfd.as_fd()).unwrap().st_size >= 80_000);
    // The compositor's delete_id for the pool it destroyed is not the client's business;
    // the next event is.
    r.event(1, "wl_display", "delete_id", &[Arg::Uint(6)], &[]);
    r.event(1, "wl_display", "delete_id", &[Arg::Uint(99)], &[]);
    let m = r.at_client().unwrap();
    let args = wire::parse_args(
        interface("wl_display").unwrap().events[1].signature,
        &m.bytes[8..],
    )
    .unwrap();
    assert_eq!(args, [Arg::Uint(99)]);
    // A buffer in the grown part is copied from the new memory.
    pwrite(s.pool_client.as_fd(), 60_000, &[0x44; 400]);
    r.request(
        6,
        "wl_shm_pool",
        "create_buffer",
        &[
            Arg::NewId(9),
            Arg::Int(60_000),
            Arg::Int(100),
            Arg::Int(1),
            Arg::Int(400),
            Arg::Uint(1),
        ],
        &[],
    );
    r.request(
        5,
        "wl_surface",
        "attach",
        &[Arg::Object(9), Arg::Int(0), Arg::Int(0)],
        &[],
    );
    r.at_far();
    r.at_far();
    commit(&mut r);
    let m = Mapping::new_backed(vfd.as_fd(), 80_000, false).unwrap();
    assert_eq!(byte(&m, 60_000), 0x44);
}

#[test]
fn keymap_arrives_as_a_local_sealed_copy() {
    let mut r = rig();
    r.registry(BASIC);
    r.bind(6, "wl_seat", 7, 3);
    r.request(3, "wl_seat", "get_keyboard", &[Arg::NewId(4)], &[]);
    r.at_far();
    let (vfd, map) = r.t.alloc(100).unwrap();
    drop(map);
    pwrite(vfd.as_fd(), 0, b"xkb_keymap { fake };\0");
    r.event(
        4,
        "wl_keyboard",
        "keymap",
        &[Arg::Uint(1), Arg::Fd, Arg::Uint(21)],
        &[vfd.as_fd()],
    );
    let m = r.at_client().unwrap();
    assert_eq!(m.object, 4);
    let fd = r.from_proxy.fds.pop_front().expect("keymap fd");
    assert!(!r.t.is_vfd(fd.as_fd()), "a local memfd, not the vfd");
    let mut b = vec![0u8; 21];
    use std::os::unix::fs::FileExt;
    std::fs::File::from(fd.try_clone().unwrap())
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert_eq!(&b, b"xkb_keymap { fake };\0");
    // SAFETY: F_GET_SEALS on an open fd.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    assert_ne!(seals & libc::F_SEAL_WRITE, 0, "the client cannot change it");
}

#[test]
fn clipboard_pipes_cross_as_virtio_pipes_both_ways() {
    let mut r = rig();
    r.registry(BASIC);
    r.bind(6, "wl_seat", 7, 3);
    r.bind(7, "wl_data_device_manager", 3, 4);
    r.request(
        4,
        "wl_data_device_manager",
        "get_data_device",
        &[Arg::NewId(5), Arg::Object(3)],
        &[],
    );
    r.at_far();
    // Paste: the compositor offers; the client asks to receive into its pipe.
    r.event(
        5,
        "wl_data_device",
        "data_offer",
        &[Arg::NewId(0xff00_0000)],
        &[],
    );
    r.at_client().unwrap();
    let (cr, cw) = sock::pipe().unwrap();
    r.request(
        0xff00_0000,
        "wl_data_offer",
        "receive",
        &[Arg::Str(Some(b"text/plain")), Arg::Fd],
        &[cw.as_fd()],
    );
    drop(cw);
    r.at_far();
    let w = r.from_far.fds.pop_front().expect("a pipe for the source");
    assert!(r.t.is_vfd(w.as_fd()));
    std::fs::File::from(w).write_all_ok(b"pasted text");
    let mut got = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(cr), &mut got).unwrap();
    assert_eq!(got, "pasted text");
    // Copy: the client is the source; the compositor asks it to send into a pipe vfd.
    r.request(
        4,
        "wl_data_device_manager",
        "create_data_source",
        &[Arg::NewId(6)],
        &[],
    );
    r.at_far();
    let p = r.t.pipe_from_peer().unwrap();
    r.event(
        6,
        "wl_data_source",
        "send",
        &[Arg::Str(Some(b"text/plain")), Arg::Fd],
        &[p.remote.as_fd()],
    );
    drop(p.remote);
    r.at_client().unwrap();
    let local = r
        .from_proxy
        .fds
        .pop_front()
        .expect("a write end for the client");
    assert!(!r.t.is_vfd(local.as_fd()), "a local pipe, not the vfd");
    std::fs::File::from(local).write_all_ok(b"copied text");
    let mut got = String::new();
    let mut reader = p.local;
    reader.read_to_string(&mut got).unwrap();
    assert_eq!(got, "copied text");
}

trait WriteAllOk {
    fn write_all_ok(self, b: &[u8]);
}
impl WriteAllOk for std::fs::File {
    fn write_all_ok(mut self, b: &[u8]) {
        std::io::Write::write_all(&mut self, b).unwrap();
    }
}
use std::io::Read as _;

#[test]
fn more_than_28_fds_are_split_into_batches_at_message_boundaries() {
    let mut r = rig();
    r.registry(BASIC);
    r.bind(1, "wl_shm", 1, 3);
    // 40 pools in one write with 40 fds (more than libwayland would send at once).
    let fds: Vec<OwnedFd> = (0..40).map(|_| memfd(4096)).collect();
    let mut data = Vec::new();
    for i in 0..40u32 {
        data.extend(wire::encode(
            3,
            opcode("wl_shm", "create_pool", true),
            &[Arg::NewId(10 + i), Arg::Fd, Arg::Int(4096)],
        ));
    }
    let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    sock::send_all(r.client.as_fd(), &data, &b).unwrap();
    for _ in 0..40 {
        r.at_far();
    }
    assert_eq!(r.from_far.fds.len(), 40);
    let with_fds: Vec<(usize, bool)> = r
        .from_far
        .recvs
        .iter()
        .copied()
        .filter(|(n, _)| *n > 0)
        .collect();
    assert!(with_fds.iter().all(|(n, _)| *n <= 28), "{with_fds:?}");
    assert!(
        with_fds.iter().all(|(_, at_boundary)| *at_boundary),
        "{with_fds:?}"
    );
    assert!(with_fds.len() >= 2);
}

#[test]
fn events_with_more_than_28_fds_reach_the_client_in_batches_of_at_most_28() {
    let mut r = rig();
    r.registry(BASIC);
    r.bind(6, "wl_seat", 7, 3);
    r.bind(7, "wl_data_device_manager", 3, 4);
    r.request(
        4,
        "wl_data_device_manager",
        "create_data_source",
        &[Arg::NewId(6)],
        &[],
    );
    r.at_far();
    let mut remotes = Vec::new();
    let mut data = Vec::new();
    for _ in 0..20 {
        let p = r.t.pipe_from_peer().unwrap();
        remotes.push(p.remote);
        data.extend(wire::encode(
            6,
            opcode("wl_data_source", "send", false),
            &[Arg::Str(Some(b"text/plain")), Arg::Fd],
        ));
    }
    // Two sends of 20 (the stand-in takes at most 28 at once), 40 events in all.
    for _ in 0..2 {
        let b: Vec<BorrowedFd<'_>> = remotes.iter().map(|f| f.as_fd()).collect();
        r.far.send(&data, &b).unwrap();
    }
    for _ in 0..40 {
        r.at_client().unwrap();
    }
    assert_eq!(r.from_proxy.fds.len(), 40);
    assert!(
        r.from_proxy.recvs.iter().all(|(n, _)| *n <= 28),
        "{:?}",
        r.from_proxy.recvs
    );
}

#[test]
fn a_bad_size_is_a_protocol_error() {
    let mut r = rig();
    let mut m = wire::encode(1, 0, &[Arg::NewId(2)]);
    m[6] = 6; // size 6: below the header
    sock::send_all(r.client.as_fd(), &m, &[]).unwrap();
    let _ = &mut r;
    r.expect_protocol_error(1);
}

#[test]
fn an_unknown_opcode_is_a_protocol_error() {
    let r = rig();
    let m = wire::encode(1, 9, &[]);
    sock::send_all(r.client.as_fd(), &m, &[]).unwrap();
    let msg = r.expect_protocol_error(1);
    assert!(msg.contains("no request 9"), "{msg}");
}

#[test]
fn a_missing_fd_is_a_protocol_error() {
    let mut r = rig();
    r.registry(BASIC);
    r.bind(1, "wl_shm", 1, 3);
    r.request(
        3,
        "wl_shm",
        "create_pool",
        &[Arg::NewId(4), Arg::Fd, Arg::Int(4096)],
        &[],
    );
    let msg = r.expect_protocol_error(1);
    assert!(msg.contains("missing fd"), "{msg}");
}

#[test]
fn an_unknown_object_and_a_used_id_are_protocol_errors() {
    let r = rig();
    r.request(77, "wl_display", "sync", &[Arg::NewId(3)], &[]);
    r.expect_protocol_error(0);
    let r = rig();
    r.request(1, "wl_display", "sync", &[Arg::NewId(1)], &[]);
    r.expect_protocol_error(0);
}

#[test]
fn a_malformed_client_is_disconnected_and_another_client_goes_on() {
    let mut good = rig();
    good.registry(BASIC);
    let bad = rig();
    sock::send_all(bad.client.as_fd(), &[0xff; 16], &[]).unwrap();
    bad.expect_protocol_error(1);
    // The good client still gets its round trip.
    good.request(1, "wl_display", "sync", &[Arg::NewId(3)], &[]);
    good.at_far();
    good.event(3, "wl_callback", "done", &[Arg::Uint(42)], &[]);
    let m = good.at_client().unwrap();
    assert_eq!(m.object, 3);
}

#[test]
fn a_refused_connection_closes_that_client_and_the_proxy_goes_on() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wayland-0");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = StandIn::new();
    let stats = Arc::new(Stats::default());
    let (tt, s): (Arc<dyn Transport>, _) = (Arc::new(t.clone()), stats.clone());
    let cfg = bulkhead_wayland::app::Config {
        connect: "wayland@gui-vm".into(),
        max_clients: 4,
    };
    std::thread::spawn(move || bulkhead_wayland::app::serve(listener, tt, s, cfg));
    // Nobody provides `wayland` (as without the grant): the client is closed at once.
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap(), 0, "closed");
    assert_eq!(stats.clients.load(Ordering::Relaxed), 0);
    // Once it is provided, the next client is served by the same proxy.
    let mut acceptor = t.listen("wayland");
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(&wire::encode(1, 0, &[Arg::NewId(3)])).unwrap();
    let (far, _) = acceptor.accept().unwrap();
    let (data, _) = far.recv().unwrap();
    assert_eq!(data, wire::encode(1, 0, &[Arg::NewId(3)]));
    assert_eq!(stats.clients.load(Ordering::Relaxed), 1);
}
