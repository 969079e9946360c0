//! The hub as a real process (the `bulkhead-hub` binary, channels inherited as `--vm
//! NAME=FD`), driven from the test process acting as the VMMs, with real memfds, pipes and
//! sockets: what every hub integration test file shares.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::protocol::{
    ConnBatch, ConnEvent, ConnId, ConnSend, FdInfo, HubEvent, Name, Refusal, VmRequest,
};
use bulkhead_policy::control::{HubClient, Request, Response};
use bulkhead_policy::Rights;
use nix::sys::socket::{setsockopt, sockopt};

pub const POLICY: &str = "version 1
grant a provide inbox c2s=memfd:rw+transfer+dup,pipe:w+transfer max-fds=8
grant b connect inbox@a
grant c provide sink c2s=memfd:rw max-fds=8
grant a connect sink@c
grant d connect sink@c
grant d provide noxfer c2s=memfd:ro max-fds=8
grant b connect noxfer@d
grant @any quota shm=64KiB shm-count=4 vfds=32
";

pub const RO: Rights = Rights::READ.union(Rights::MAP);

pub struct TestHub {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub vms: HashMap<&'static str, Channel>,
    pub control: PathBuf,
    pub audit: PathBuf,
    pub tag: u32,
}

/// How to run the hub process beyond its arguments.
#[derive(Default, Clone, Copy)]
pub struct Spawn {
    /// `RLIMIT_NOFILE` (soft and hard) for the hub.
    pub nofile: Option<u64>,
    /// Run the hub unprivileged: as this uid (and gid) when the test runs as root.
    pub uid: Option<u32>,
}

/// `--allow-root` when this test runs as root (the hub refuses root without it).
pub fn allow_root() -> Option<&'static str> {
    nix::unistd::geteuid().is_root().then_some("--allow-root")
}

pub fn name(s: &str) -> Name {
    Name::try_from(s).unwrap()
}

pub fn timeout(ch: &Channel) {
    // A safety net against a hung test, not a timing assertion.
    let tv = nix::sys::time::TimeVal::new(60, 0);
    setsockopt(&ch.as_fd(), sockopt::ReceiveTimeout, &tv).unwrap();
}

/// One VMM's end of a hub connection: a channel, plus the events of datagrams already read
/// (one datagram from the hub may carry several). The `recv`-style helpers skip `Accepted`
/// verdicts (recorded in `accepted`) and `Ready`; `next_any` returns everything.
#[derive(Debug)]
pub struct Peer {
    pub ch: Channel,
    buf: RefCell<VecDeque<(ConnEvent, Vec<OwnedFd>)>>,
    pub accepted: RefCell<Vec<u32>>,
}

impl Deref for Peer {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        &self.ch
    }
}

impl Peer {
    pub fn new(ch: Channel) -> Peer {
        Peer {
            ch,
            buf: RefCell::new(VecDeque::new()),
            accepted: RefCell::new(Vec::new()),
        }
    }

    pub fn into_fd(self) -> OwnedFd {
        assert!(self.buf.borrow().is_empty(), "events left unread");
        self.ch.into_fd()
    }

    /// Reads one datagram into the buffer (blocking with `wait`).
    fn fill(&self, wait: bool) -> Result<(), ChannelError> {
        let (batch, fds) = if wait {
            self.ch.recv::<ConnBatch>()?
        } else {
            self.ch.try_recv::<ConnBatch>()?
        };
        let mut fds = fds.into_iter();
        let mut buf = self.buf.borrow_mut();
        for ev in batch {
            let n = match &ev {
                ConnEvent::Deliver { fds, .. } => fds.len(),
                _ => 0,
            };
            let mine: Vec<OwnedFd> = fds.by_ref().take(n).collect();
            assert_eq!(mine.len(), n, "a delivery without its fds");
            buf.push_back((ev, mine));
        }
        assert!(fds.next().is_none(), "fds left over in a batch");
        Ok(())
    }

    /// The next event of any kind (blocking).
    pub fn next_any(&self) -> Result<(ConnEvent, Vec<OwnedFd>), ChannelError> {
        loop {
            if let Some(e) = self.buf.borrow_mut().pop_front() {
                return Ok(e);
            }
            self.fill(true)?;
        }
    }

    /// The next event of any kind, if one came (not blocking).
    pub fn try_next_any(&self) -> Option<(ConnEvent, Vec<OwnedFd>)> {
        loop {
            if let Some(e) = self.buf.borrow_mut().pop_front() {
                return Some(e);
            }
            if self.fill(false).is_err() {
                return None;
            }
        }
    }

    fn skip(&self, ev: &ConnEvent) -> bool {
        match ev {
            ConnEvent::Accepted { seq } => {
                self.accepted.borrow_mut().push(*seq);
                true
            }
            ConnEvent::Ready => true,
            _ => false,
        }
    }

    /// The next delivery or refusal (blocking); verdicts `Accepted` are recorded.
    pub fn next(&self) -> Result<(ConnEvent, Vec<OwnedFd>), ChannelError> {
        loop {
            let e = self.next_any()?;
            if !self.skip(&e.0) {
                return Ok(e);
            }
        }
    }

    /// The next delivery or refusal, if one came.
    pub fn try_next(&self) -> Option<(ConnEvent, Vec<OwnedFd>)> {
        loop {
            let e = self.try_next_any()?;
            if !self.skip(&e.0) {
                return Some(e);
            }
        }
    }

    /// Waits for the verdict `Accepted { seq }` (a refusal of `seq` fails the test); other
    /// events stay for later readers, in order.
    pub fn expect_accepted(&self, seq: u32) {
        loop {
            let found = self.accepted.borrow().iter().position(|s| *s == seq);
            if let Some(i) = found {
                self.accepted.borrow_mut().remove(i);
                return;
            }
            {
                let mut buf = self.buf.borrow_mut();
                let hit = buf.iter().position(|(e, _)| {
                    matches!(e, ConnEvent::Accepted { seq: s } | ConnEvent::Refused { seq: s, .. } if *s == seq)
                });
                if let Some(i) = hit {
                    match buf.remove(i) {
                        Some((ConnEvent::Accepted { .. }, _)) => return,
                        other => panic!("send {seq}: {other:?}"),
                    }
                }
            }
            self.fill(true).unwrap();
        }
    }
}

impl TestHub {
    pub fn start(policy: &str, vms: &[&'static str], extra: &[&str]) -> TestHub {
        TestHub::start_with(policy, vms, extra, Spawn::default())
    }

    pub fn start_with(policy: &str, vms: &[&'static str], extra: &[&str], spawn: Spawn) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        let pdir = dir.path().join("policy.d");
        std::fs::create_dir(&pdir).unwrap();
        std::fs::write(pdir.join("10-test.policy"), policy).unwrap();
        let control = dir.path().join("hub.sock");
        let audit = dir.path().join("audit.jsonl");
        let as_uid = spawn
            .uid
            .filter(|_| nix::unistd::geteuid().is_root())
            .map(nix::unistd::Uid::from_raw);
        if let Some(uid) = as_uid {
            // The unprivileged hub reads the policy and writes the audit log and socket.
            let gid = nix::unistd::Gid::from_raw(uid.as_raw());
            for p in [dir.path(), pdir.as_path(), &pdir.join("10-test.policy")] {
                nix::unistd::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"));
        cmd.arg("--policy-dir")
            .arg(&pdir)
            .arg("--control-socket")
            .arg(&control)
            .arg("--audit-log")
            .arg(&audit)
            .arg("--exit-when-idle")
            .args(extra)
            .stdin(Stdio::null())
            .env("RUST_LOG", "warn");
        if as_uid.is_none() {
            cmd.args(allow_root());
        }
        let mut mine = HashMap::new();
        let mut theirs: Vec<Channel> = Vec::new();
        for vm in vms {
            let (v, h) = Channel::pair().unwrap();
            timeout(&v);
            cmd.arg("--vm").arg(format!("{vm}={}", h.as_raw_fd()));
            mine.insert(*vm, v);
            theirs.push(h);
        }
        let raws: Vec<RawFd> = theirs.iter().map(|c| c.as_raw_fd()).collect();
        let nofile = spawn.nofile;
        let uid = as_uid.map(|u| u.as_raw());
        // SAFETY: the closure only calls async-signal-safe functions (fcntl, setrlimit,
        // setgroups, setgid, setuid) on this child's own state.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &raws {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(u) = uid {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(u) != 0
                        || libc::setuid(u) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        let hub = TestHub {
            child,
            dir,
            vms: mine,
            control,
            audit,
            tag: 100,
        };
        // Wait until the control socket exists (readiness, not timing).
        for _ in 0..2000 {
            if hub.control.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(hub.control.exists(), "hub did not start");
        hub
    }

    pub fn vm(&self, n: &str) -> &Channel {
        &self.vms[n]
    }

    pub fn next_tag(&mut self) -> u32 {
        self.tag += 1;
        self.tag
    }

    pub fn request(&mut self, vm: &str, req: VmRequest) -> (HubEvent, Vec<OwnedFd>) {
        self.vm(vm).send(&req, &[]).unwrap();
        self.vm(vm).recv::<HubEvent>().unwrap()
    }

    pub fn provide(&mut self, vm: &str, svc: &str) -> HubEvent {
        let tag = self.next_tag();
        self.request(
            vm,
            VmRequest::Provide {
                tag,
                service: name(svc),
            },
        )
        .0
    }

    /// Client side of a connect; the provider's Accept is collected too.
    pub fn connect(
        &mut self,
        vm: &str,
        svc: &str,
        provider: &str,
    ) -> Result<(ConnId, Peer, Peer), Refusal> {
        let tag = self.next_tag();
        let (ev, mut fds) = self.request(
            vm,
            VmRequest::Connect {
                tag,
                service: name(svc),
                provider: Some(name(provider)),
            },
        );
        match ev {
            HubEvent::Connected { tag: t, conn } => {
                assert_eq!(t, tag);
                let client = Channel::from_fd(fds.pop().unwrap());
                let (acc, mut pfds) = self.vm(provider).recv::<HubEvent>().unwrap();
                match acc {
                    HubEvent::Accept {
                        conn: c,
                        name: n,
                        service,
                    } => {
                        assert_eq!(c, conn);
                        assert_eq!(n.as_str(), format!("wl-conn-{conn}"));
                        assert_eq!(service.as_str(), svc);
                    }
                    other => panic!("provider got {other:?}"),
                }
                let server = Channel::from_fd(pfds.pop().unwrap());
                timeout(&client);
                timeout(&server);
                Ok((conn, Peer::new(client), Peer::new(server)))
            }
            HubEvent::Refused { tag: t, error } => {
                assert_eq!(t, tag);
                Err(error)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    pub fn alloc(&mut self, vm: &str, size: u64) -> Result<(OwnedFd, u64), Refusal> {
        let tag = self.next_tag();
        match self.request(vm, VmRequest::AllocShm { tag, size }) {
            (HubEvent::ShmAllocated { size, .. }, mut fds) => Ok((fds.pop().unwrap(), size)),
            (HubEvent::Refused { error, .. }, _) => Err(error),
            (other, _) => panic!("unexpected {other:?}"),
        }
    }

    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn hub_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// The hub's fd count once it is quiet: unchanged across more than one sweep interval
    /// (the hub sweeps memfds it watches at least once a second). A process another test
    /// thread spawns holds copies of this process's fds between fork and exec, so a memfd the
    /// hub watches may look held a moment longer than this test held it; and a probe for a
    /// memfd nobody holds any more goes at the next sweep. Both settle here.
    pub fn hub_fds_quiet(&self) -> usize {
        let mut n = self.hub_fds();
        for _ in 0..10 {
            std::thread::sleep(std::time::Duration::from_millis(1300));
            let m = self.hub_fds();
            if m == n {
                break;
            }
            n = m;
        }
        n
    }

    pub fn control(&self, req: &Request) -> Response {
        HubClient::connect(&self.control)
            .unwrap()
            .request(req)
            .unwrap()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.vms.clear(); // closing every channel makes the hub exit (--exit-when-idle)
        let _ = self.child.wait();
    }
}

/// A whole send of its own (part 0, no more parts) with `seq` as its data.
pub fn msg(seq: u32, rights: &[Rights]) -> ConnSend {
    ConnSend {
        seq,
        data: seq.to_le_bytes().to_vec(),
        rights: rights.iter().copied().collect(),
        part: 0,
        more: false,
    }
}

pub fn send(conn: &Channel, seq: u32, fds: &[(BorrowedFd<'_>, Rights)]) {
    let rights: Vec<Rights> = fds.iter().map(|(_, r)| *r).collect();
    let raw: Vec<BorrowedFd<'_>> = fds.iter().map(|(f, _)| *f).collect();
    conn.send(&msg(seq, &rights), &raw).unwrap();
}

pub fn recv(conn: &Peer) -> (ConnEvent, Vec<OwnedFd>) {
    conn.next().unwrap()
}

pub fn expect_refused(conn: &Peer, seq: u32, error: Refusal) {
    match recv(conn) {
        (ConnEvent::Refused { seq: s, error: e }, fds) => {
            assert_eq!((s, e), (seq, error));
            assert!(fds.is_empty());
        }
        other => panic!("expected refusal of {seq}, got {other:?}"),
    }
}

pub fn expect_deliver(conn: &Peer, seq: u32) -> (Vec<FdInfo>, Vec<OwnedFd>) {
    match recv(conn) {
        (ConnEvent::Deliver { data, fds: infos }, fds) => {
            assert_eq!(data, seq.to_le_bytes().to_vec(), "wrong frame delivered");
            assert_eq!(infos.len(), fds.len());
            (infos.to_vec(), fds)
        }
        other => panic!("expected delivery of {seq}, got {other:?}"),
    }
}

/// Nothing but verdicts is waiting.
pub fn nothing_pending(conn: &Peer) {
    if let Some(e) = conn.try_next() {
        panic!("unexpected {e:?}");
    }
}

/// The peer closed (EOF), after any events still queued (which are returned).
pub fn expect_closed(conn: &Peer) -> Vec<ConnEvent> {
    let mut before = Vec::new();
    loop {
        match conn.next_any() {
            Ok((ev, _)) => before.push(ev),
            Err(ChannelError::Closed) => return before,
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

pub fn memfd() -> OwnedFd {
    // SAFETY: valid name and flags; checked below.
    let raw =
        unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The mode a VMM gives its memfds (the hub refuses group/other-writable ones).
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    nix::unistd::ftruncate(&fd, 4096).unwrap();
    // SAFETY: F_ADD_SEALS with an int on our own memfd.
    assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), 1033, 0x2 | 0x4) }, 0);
    fd
}

pub fn release(h: &TestHub, vm: &str, fd: BorrowedFd<'_>) {
    let st = nix::sys::stat::fstat(fd).unwrap();
    h.vm(vm)
        .send(
            &VmRequest::Release {
                dev: st.st_dev,
                ino: st.st_ino,
            },
            &[],
        )
        .unwrap();
}

/// Waits until any of `fds` is readable (a hang guard of 60 s, not a timing assertion).
pub fn wait_readable(fds: &[BorrowedFd<'_>]) {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(p.len()).unwrap();
    // SAFETY: valid pollfds for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), n, 60_000) };
    assert!(r > 0, "hub stalled");
}
