//! Fuzz the virtio_wl device's request handling (`WlState`) the way a hostile guest and
//! hostile peers drive it: chains on the out queue (well-formed commands split over
//! descriptors, and raw descriptors anywhere in guest memory), buffers on the in queue,
//! host peers sending data and fds (memfds, pipes, sockets, a char device) on connected
//! sockets, and a hub channel whose answers and events the input chooses (queued before the
//! request, so the device never waits), and the far side of each hub connection (a thread
//! that gives every send the verdict the input chose: accepted, refused, or busy then
//! ready). Real guest memory, real sockets, pipes and memfds.
//!
//! Checks: no panic; every answer is a known response of the right size; after a reset
//! (`clear`) the device holds no vfd, no shared memory and no pending message; and the
//! process has exactly the fds it had before the input (nothing leaks).
#![no_main]

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use arbitrary::Arbitrary;
use bulkhead_ipc::channel::Channel;
use bulkhead_ipc::hub::protocol::{
    ConnBatch, ConnEvent, ConnSend, FdInfo, HubEvent, Name, Refusal, VmRequest,
};
use bulkhead_policy::{FdType, Rights};
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::{WlSocket, WlSockets};
use bulkhead_vmm::devices::virtio::wl::state::{WlLimits, WlState};
use bulkhead_vmm::devices::virtio::wl::vfd::ShmWindow;
use bulkhead_vmm::vstate::memory::GuestMemoryMmap;
use bulkhead_vmm_fuzz::{memory, open_fds, Desc, RawQueue, ANSWERS, STAGING};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// A vfd id as the guest picks it.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Id {
    Guest(u8),
    Host(u8),
    Any(u32),
}

impl Id {
    fn get(self) -> u32 {
        match self {
            Id::Guest(n) => u32::from(n % 8),
            Id::Host(n) => VFD_HOST_ID_BIT | u32::from(n % 8),
            Id::Any(v) => v,
        }
    }
}

/// Socket names: the registry's, the hub's forms, and junk.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum NameChoice {
    Listening,
    Pair,
    Unnamed,
    ListenSvc,
    Svc,
    SvcAt,
    Conn(u8),
    Bad,
}

impl NameChoice {
    fn get(self) -> String {
        match self {
            NameChoice::Listening => "listening".into(),
            NameChoice::Pair => "pair".into(),
            NameChoice::Unnamed => String::new(),
            NameChoice::ListenSvc => "listen:svc".into(),
            NameChoice::Svc => "svc".into(),
            NameChoice::SvcAt => "svc@prov".into(),
            NameChoice::Conn(n) => format!("wl-conn-{}", n % 4),
            NameChoice::Bad => "a@b@c%d\n".into(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Cmd {
    Alloc {
        id: Id,
        flags: u8,
        size: u32,
    },
    Close {
        id: Id,
    },
    Send {
        id: Id,
        vfds: Vec<Id>,
        data: Vec<u8>,
    },
    SendForeign {
        id: Id,
        entries: Vec<(u8, Id)>,
        data: Vec<u8>,
    },
    NewCtx {
        id: Id,
    },
    NewCtxNamed {
        id: Id,
        name: NameChoice,
    },
    NewPipe {
        id: Id,
        flags: u8,
    },
    Other {
        ty: u16,
        body: Vec<u8>,
    },
}

fn hdr(ty: u32) -> Vec<u8> {
    let mut v = ty.to_le_bytes().to_vec();
    v.extend_from_slice(&[0; 4]);
    v
}

fn vfd_new(ty: u32, id: u32, flags: u32, size: u32, name: &str) -> Vec<u8> {
    let mut v = hdr(ty);
    for x in [id, flags, 0, 0, size] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let mut n = [0u8; 36];
    for (d, s) in n.iter_mut().zip(name.bytes()) {
        *d = s;
    }
    v.extend_from_slice(&n);
    v
}

impl Cmd {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Cmd::Alloc { id, flags, size } => vfd_new(
                CMD_VFD_NEW,
                id.get(),
                u32::from(*flags & 7),
                size % (1 << 20),
                "",
            ),
            Cmd::Close { id } => {
                let mut v = hdr(CMD_VFD_CLOSE);
                v.extend_from_slice(&id.get().to_le_bytes());
                v
            }
            Cmd::Send { id, vfds, data } => {
                let mut v = hdr(CMD_VFD_SEND);
                v.extend_from_slice(&id.get().to_le_bytes());
                v.extend_from_slice(&(vfds.len() as u32).to_le_bytes());
                for x in vfds {
                    v.extend_from_slice(&x.get().to_le_bytes());
                }
                v.extend_from_slice(data);
                v
            }
            Cmd::SendForeign { id, entries, data } => {
                let mut v = hdr(CMD_VFD_SEND_FOREIGN_ID);
                v.extend_from_slice(&id.get().to_le_bytes());
                v.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for (kind, x) in entries {
                    v.extend_from_slice(&u32::from(*kind % 3).to_le_bytes());
                    v.extend_from_slice(&x.get().to_le_bytes());
                }
                v.extend_from_slice(data);
                v
            }
            Cmd::NewCtx { id } => vfd_new(CMD_VFD_NEW_CTX, id.get(), VFD_READ | VFD_WRITE, 0, ""),
            Cmd::NewCtxNamed { id, name } => {
                vfd_new(CMD_VFD_NEW_CTX_NAMED, id.get(), 0, 0, &name.get())
            }
            Cmd::NewPipe { id, flags } => {
                vfd_new(CMD_VFD_NEW_PIPE, id.get(), u32::from(*flags & 3), 0, "")
            }
            Cmd::Other { ty, body } => {
                let mut v = hdr(0x100 + u32::from(*ty % 0x20));
                v.extend_from_slice(body);
                v
            }
        }
    }
}

/// An fd a peer passes along.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum PeerFd {
    Memfd {
        pages: u8,
        sealed: bool,
        read_only: bool,
    },
    EmptyMemfd,
    PipeReadEnd,
    PipeWriteEnd,
    Socket,
    DevNull,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HubAnswer {
    Provided,
    Connected,
    Shm { pages: u8 },
    Refused,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A command on the out queue, split into `split` readable pieces, then an answer buffer
    /// of `resp` bytes.
    Command { cmd: Cmd, split: u8, resp: u8 },
    /// A raw chain.
    Chain(Vec<Desc>),
    /// A head index the guest makes available as is.
    Head(u16),
    /// In-queue buffers of these lengths are offered.
    OfferIn(Vec<u16>),
    /// Host peer `which` sends data and fds.
    PeerSend {
        which: u8,
        data: Vec<u8>,
        fds: Vec<PeerFd>,
    },
    /// Host peer `which` closes.
    PeerClose { which: u8 },
    /// What the worker does when host fds are ready.
    ReadHost,
    /// The hub answers the next request.
    HubAnswer(HubAnswer),
    /// The hub hands over a connection (the faux accept).
    HubAccept { conn: u8 },
    /// The hub says a connection closed.
    HubClosed { conn: u8 },
    /// The hub delivers a frame on hub connection `which`.
    HubDeliver {
        which: u8,
        data: Vec<u8>,
        fds: Vec<(PeerFd, u16)>,
    },
    /// The worker polls the hub channel.
    ReadHub,
    /// BAR 2 moved.
    MoveWindow(u32),
    /// Device reset.
    Reset,
}

/// What the far side of a hub connection answers a send.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Verdict {
    Accept,
    Refuse,
    BusyThenReady,
}

#[derive(Arbitrary, Debug)]
struct Input {
    with_hub: bool,
    trans_flags: bool,
    /// Verdicts for the sends on hub connections, in turn (all accepted when empty).
    verdicts: Vec<Verdict>,
    ops: Vec<Op>,
}

/// The far side of one hub connection: answers each send (its last part) with the next
/// verdict, until the VMM's end closes.
fn far_side(chan: Channel, verdicts: Vec<Verdict>) {
    let mut turn = 0usize;
    loop {
        let Ok((send, _fds)) = chan.recv::<ConnSend>() else {
            return;
        };
        if send.more {
            continue;
        }
        let v = if verdicts.is_empty() {
            Verdict::Accept
        } else {
            verdicts[turn % verdicts.len()]
        };
        turn += 1;
        let batch: ConnBatch = match v {
            Verdict::Accept => vec![ConnEvent::Accepted { seq: send.seq }],
            Verdict::Refuse => vec![ConnEvent::Refused {
                seq: send.seq,
                error: Refusal::PermissionDenied,
            }],
            Verdict::BusyThenReady => vec![
                ConnEvent::Refused {
                    seq: send.seq,
                    error: Refusal::Busy,
                },
                ConnEvent::Ready,
            ],
        };
        if chan.send(&batch, &[]).is_err() {
            return;
        }
    }
}

fn memfd(pages: u64, sealed: bool) -> Option<OwnedFd> {
    // SAFETY: a static name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on an fd we own.
    unsafe {
        libc::ftruncate(fd.as_raw_fd(), (pages * 4096) as libc::off_t);
        if sealed {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE,
            );
        }
    }
    Some(fd)
}

fn pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: room for two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    // SAFETY: two new fds nothing else owns.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn peer_fd(f: PeerFd) -> Option<OwnedFd> {
    match f {
        PeerFd::Memfd {
            pages,
            sealed,
            read_only,
        } => {
            let m = memfd(u64::from(pages % 4) + 1, sealed)?;
            if read_only {
                let path = format!("/proc/self/fd/{}", m.as_raw_fd());
                std::fs::File::open(path).ok().map(OwnedFd::from)
            } else {
                Some(m)
            }
        }
        PeerFd::EmptyMemfd => memfd(0, false),
        PeerFd::PipeReadEnd => pipe().map(|p| p.0),
        PeerFd::PipeWriteEnd => pipe().map(|p| p.1),
        PeerFd::Socket => UnixStream::pair().ok().map(|p| OwnedFd::from(p.0)),
        PeerFd::DevNull => std::fs::File::open("/dev/null").ok().map(OwnedFd::from),
    }
}

fn fd_info(f: PeerFd, rights: u16) -> FdInfo {
    let fd_type = match f {
        PeerFd::Memfd { .. } | PeerFd::EmptyMemfd => FdType::Memfd,
        PeerFd::PipeReadEnd | PeerFd::PipeWriteEnd => FdType::Pipe,
        PeerFd::Socket => FdType::Socket,
        PeerFd::DevNull => FdType::Fence,
    };
    FdInfo {
        fd_type,
        write_end: matches!(f, PeerFd::PipeWriteEnd),
        rights: Rights::from_bits_truncate(u32::from(rights)),
    }
}

/// Checks an answer the device wrote for a command chain.
fn check_answer(mem: &GuestMemoryMmap, len: u32) {
    if len == 0 {
        return;
    }
    let code: u32 = mem.read_obj(GuestAddress(ANSWERS)).unwrap_or(0);
    let ok = match code {
        RESP_VFD_NEW => len <= VFD_NEW_SIZE as u32,
        RESP_OK | RESP_ERR | RESP_OUT_OF_MEMORY | RESP_INVALID_ID | RESP_INVALID_TYPE
        | RESP_INVALID_FLAGS | RESP_INVALID_CMD => len <= 4,
        // A short answer buffer cuts the code itself.
        _ => len < 4,
    };
    if !ok {
        panic!("answer {code:#x} of {len} bytes");
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    st: WlState,
    out: RawQueue,
    hub: Option<Channel>,
    /// Requests the hub end has read (the next request's tag is this + 1).
    requests: u32,
    peers: Vec<UnixStream>,
    hub_conns: Vec<Channel>,
    far_sides: Vec<std::thread::JoinHandle<()>>,
    verdicts: Vec<Verdict>,
    listener: UnixListener,
}

impl Harness {
    /// Our end of a new hub connection: a far-side thread answers the VMM's sends, and
    /// `hub_conns` keeps a second handle for deliveries.
    fn far_end(&mut self, theirs: Channel) {
        let fd = theirs.into_fd();
        let Ok(dup) = fd.try_clone() else { return };
        let verdicts = self.verdicts.clone();
        let chan = Channel::from_fd(fd);
        if let Ok(t) = std::thread::Builder::new().spawn(move || far_side(chan, verdicts)) {
            self.far_sides.push(t);
        }
        self.hub_conns.push(Channel::from_fd(dup));
    }

    fn drain_hub(&mut self) {
        let Some(h) = &self.hub else { return };
        while let Ok((req, _fds)) = h.try_recv::<VmRequest>() {
            if !matches!(req, VmRequest::Hello | VmRequest::Release { .. }) {
                self.requests += 1;
            }
        }
    }

    fn accept_peers(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            let _ = s.set_nonblocking(true);
            self.peers.push(s);
        }
    }

    /// Runs the out queue; for a command the harness staged (`staged`), checks the answer
    /// written at ANSWERS; for any chain, that the used length is at most an answer's.
    fn run_out(&mut self, staged: bool) {
        let before = self.out.used_idx(&self.mem);
        let mut q = self.out.queue_resumed(&self.mem);
        self.st.process_out(&mut q, &self.mem);
        let after = self.out.used_idx(&self.mem);
        for i in before..after {
            let (_, len) = self.out.used_elem(&self.mem, i);
            if len as usize > VFD_NEW_SIZE {
                panic!("a used length of {len} bytes");
            }
            if staged {
                check_answer(&self.mem, len);
            }
        }
        self.out.recycle();
        self.drain_hub();
        self.accept_peers();
    }

    fn op(&mut self, op: Op) {
        match op {
            Op::Command { cmd, split, resp } => {
                let bytes = cmd.bytes();
                if bytes.len() > 0x2_0000 {
                    return;
                }
                let _ = self.mem.write_slice(&bytes, GuestAddress(STAGING));
                let pieces = usize::from(split % 4) + 1;
                let step = bytes.len().div_ceil(pieces).max(1);
                let mut bufs: Vec<(u64, u32, bool)> = bytes
                    .chunks(step)
                    .enumerate()
                    .map(|(i, c)| (STAGING + (i * step) as u64, c.len() as u32, false))
                    .collect();
                bufs.push((ANSWERS, u32::from(resp % 64), true));
                if self.out.push_plain(&self.mem, &bufs) {
                    self.run_out(true);
                }
            }
            Op::Chain(descs) => {
                if self.out.push(&self.mem, &descs) {
                    self.run_out(false);
                }
            }
            Op::Head(h) => {
                self.out.push_head(&self.mem, h);
                self.run_out(false);
            }
            Op::OfferIn(lens) => {
                let mut inq = RawQueue::new(&self.mem, 1);
                for (i, l) in lens.iter().take(32).enumerate() {
                    let addr = 0x1_0000 + 0x1_0000 * ((i % 2) as u64) + (i as u64 * 0x800);
                    inq.push_plain(&self.mem, &[(addr, u32::from(*l % 0x1100), true)]);
                }
                let mut q = inq.queue();
                self.st.process_in(&mut q, &self.mem);
            }
            Op::PeerSend { which, data, fds } => {
                if self.peers.is_empty() {
                    return;
                }
                let i = usize::from(which) % self.peers.len();
                let owned: Vec<OwnedFd> = fds.iter().take(30).filter_map(|f| peer_fd(*f)).collect();
                let borrowed: Vec<_> = owned.iter().map(|f| f.as_fd()).collect();
                let _ = bulkhead_vmm::devices::virtio::wl::scm::send_with_fds(
                    self.peers[i].as_fd(),
                    &data,
                    &borrowed,
                );
            }
            Op::PeerClose { which } => {
                if !self.peers.is_empty() {
                    let i = usize::from(which) % self.peers.len();
                    self.peers.swap_remove(i);
                }
            }
            Op::ReadHost => {
                self.st.read_host();
            }
            Op::HubAnswer(a) => {
                let tag = self.requests + 1;
                let Some(h) = &self.hub else { return };
                match a {
                    HubAnswer::Provided => {
                        let _ = h.try_send(&HubEvent::Provided { tag }, &[]);
                    }
                    HubAnswer::Connected => {
                        if let Ok((ours, theirs)) = Channel::pair() {
                            let fd = ours.into_fd();
                            let _ =
                                h.try_send(&HubEvent::Connected { tag, conn: tag }, &[fd.as_fd()]);
                            self.far_end(theirs);
                        }
                    }
                    HubAnswer::Shm { pages } => {
                        if let Some(m) = memfd(u64::from(pages % 4) + 1, false) {
                            let size = (u64::from(pages % 4) + 1) * 4096;
                            let _ = h.try_send(&HubEvent::ShmAllocated { tag, size }, &[m.as_fd()]);
                        }
                    }
                    HubAnswer::Refused => {
                        let _ = h.try_send(
                            &HubEvent::Refused {
                                tag,
                                error: Refusal::PermissionDenied,
                            },
                            &[],
                        );
                    }
                }
            }
            Op::HubAccept { conn } => {
                let Some(h) = &self.hub else { return };
                if let Ok((ours, theirs)) = Channel::pair() {
                    let conn = u32::from(conn % 4);
                    let (Ok(service), Ok(name)) = (
                        Name::try_from("svc"),
                        Name::try_from(format!("wl-conn-{conn}").as_str()),
                    ) else {
                        return;
                    };
                    let fd = ours.into_fd();
                    let _ = h.try_send(
                        &HubEvent::Accept {
                            service,
                            conn,
                            name,
                        },
                        &[fd.as_fd()],
                    );
                    self.far_end(theirs);
                }
            }
            Op::HubClosed { conn } => {
                let Some(h) = &self.hub else { return };
                let _ = h.try_send(
                    &HubEvent::Closed {
                        tag: 0,
                        conn: u32::from(conn % 4),
                    },
                    &[],
                );
            }
            Op::HubDeliver { which, data, fds } => {
                if self.hub_conns.is_empty() {
                    return;
                }
                let i = usize::from(which) % self.hub_conns.len();
                let mut infos = heapless::Vec::new();
                let mut owned = Vec::new();
                for (f, rights) in fds.iter().take(8) {
                    if let Some(fd) = peer_fd(*f) {
                        if infos.push(fd_info(*f, *rights)).is_ok() {
                            owned.push(fd);
                        }
                    }
                }
                let borrowed: Vec<_> = owned.iter().map(|f| f.as_fd()).collect();
                let data: Vec<u8> = data.into_iter().take(16 << 10).collect();
                let batch: ConnBatch = vec![ConnEvent::Deliver { data, fds: infos }];
                let _ = self.hub_conns[i].try_send(&batch, &borrowed);
            }
            Op::ReadHub => {
                self.st.read_hub();
                self.drain_hub();
            }
            Op::MoveWindow(page) => self.st.move_window(u64::from(page) << 32),
            Op::Reset => {
                self.st.clear();
                self.drain_hub();
            }
        }
    }
}

fn run(input: Input) {
    let mem = memory();
    let sockets = WlSockets::new();
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(_) => return,
    };
    let path = dir.path().join("l");
    let Ok(listener) = UnixListener::bind(&path) else {
        return;
    };
    let _ = listener.set_nonblocking(true);
    let _ = sockets.add("listening", WlSocket::Listening(path));
    let Ok((pair_ours, pair_theirs)) = UnixStream::pair() else {
        return;
    };
    let _ = pair_ours.set_nonblocking(true);
    let _ = sockets.add("pair", WlSocket::NonListening(pair_theirs));
    let Ok(window) = ShmWindow::new(None, 0x10_0000_0000) else {
        return;
    };
    let limits = WlLimits {
        max_vfds: 24,
        max_shm_bytes: 64 << 10,
        max_shm_count: 6,
    };
    let mut st = WlState::new(sockets.clone(), window, limits);
    st.set_features(if input.trans_flags {
        VIRTIO_WL_F_TRANS_FLAGS
    } else {
        0
    });
    st.set_send_wait(Duration::ZERO);
    let mut hub = None;
    if input.with_hub {
        if let Ok((ours, theirs)) = Channel::pair() {
            if let Ok(mut link) = HubLink::new(ours.into_fd(), sockets.clone()) {
                link.set_answer_timeout(Duration::ZERO);
                st.set_hub(link);
                hub = Some(theirs);
            }
        }
    }
    let out = RawQueue::new(&mem, 0);
    let mut h = Harness {
        mem,
        st,
        out,
        hub,
        requests: 0,
        peers: vec![pair_ours],
        hub_conns: Vec::new(),
        far_sides: Vec::new(),
        verdicts: input.verdicts,
        listener,
    };
    h.drain_hub();
    for op in input.ops.into_iter().take(64) {
        h.op(op);
    }
    h.st.clear();
    let (bytes, count) = h.st.shm_usage();
    if h.st.vfd_count() != 0 || h.st.pending() != 0 || bytes != 0 || count != 0 {
        panic!(
            "after a reset: {} vfds, {} pending, shm {bytes} bytes in {count}",
            h.st.vfd_count(),
            h.st.pending()
        );
    }
    if let Some(link) = h.st.hub() {
        if link.listener_count() != 0 {
            panic!("{} listener contexts after a reset", link.listener_count());
        }
    }
    // Every far side ends once the VMM's ends of the connections are gone (a far side
    // still waiting would be a connection the device kept: the join then hangs, which
    // libFuzzer reports as a timeout).
    let far_sides = std::mem::take(&mut h.far_sides);
    drop(h);
    for t in far_sides {
        let _ = t.join();
    }
    let _ = std::io::stderr().flush();
}

fuzz_target!(|input: Input| {
    let before = open_fds();
    run(input);
    let after = open_fds();
    if after != before {
        panic!("fds leaked: {before} before, {after} after");
    }
});
