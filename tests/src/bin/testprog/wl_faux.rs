//! The faux accept end to end, across two L2 guests and an L1 relay that plays the hub:
//!
//! - `wl-faux-relay LISTEN SVC CTL` (on L1) listens on `LISTEN` (the server VMM's
//!   `--wl-socket listen=LISTEN`: the server guest's listener context) and `SVC` (the client
//!   VMM's `--wl-socket svc=SVC`). When the client connects it makes a socketpair, hands one
//!   end to the server VMM with `WlAdd { name: "wl-conn-%d" }` over its control socket `CTL`
//!   (the fd by SCM_RIGHTS), writes the chosen name and `\n` on the listener connection, and
//!   relays messages and their fds between the client's connection and the other end.
//! - `wl-faux-server` (in the server guest) binds `bulkhead_wl::Listener` on "listen" and
//!   accepts; `wl-faux-client` (in the client guest) connects to "svc". The two exchange
//!   data and one shared-memory buffer each, through the relay, and each writes into the
//!   other's buffer: the writes are seen across the two VMs (zero copy).
//!
//! Every side prints `PASS …` lines (or `FAIL: …`) that the test asserts.

use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::control::{ControlRequest, ControlResponse};
use bulkhead_wl::{Listener, SharedMemory, Wl};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::testprog_wl::{e, inherited_fd, put_cstr, recv_with_fds, Res};

const SHM_SIZE: usize = 4096;

fn pass(msg: &str) {
    println!("testprog: PASS {msg}");
}

/// A NUL-terminated string at `off`, read with volatile loads (another VM writes it).
fn shared_cstr(map: &[u8], off: usize) -> String {
    let mut out = Vec::new();
    for b in map.iter().skip(off).take(64) {
        // SAFETY: `b` is a valid reference into the mapping; a volatile read of one byte.
        let v = unsafe { std::ptr::read_volatile(b) };
        if v == 0 {
            break;
        }
        out.push(v);
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn expect_cstr(map: &[u8], off: usize, want: &str, what: &str) -> Result<(), String> {
    let got = shared_cstr(map, off);
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: expected {want:?}, found {got:?}"))
    }
}

fn one_fd(data: &[u8], fds: Vec<OwnedFd>, want: &[u8]) -> Result<OwnedFd, String> {
    if data != want || fds.len() != 1 {
        return Err(format!(
            "expected {:?} with 1 fd, got {:?} with {} fds",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(data),
            fds.len()
        ));
    }
    fds.into_iter().next().ok_or_else(|| "no fd".to_string())
}

/// The server guest: accepts one connection through the faux accept.
pub fn server() -> Res {
    let wl = Wl::open().map_err(e("open /dev/wl0"))?;
    let mut listener = Listener::bind(&wl, "listen").map_err(e("bind the listener"))?;
    pass("server: listener bound on \"listen\"");
    let (conn, name) = listener.accept().map_err(e("accept"))?;
    if !name.starts_with("wl-conn-") {
        return Err(format!("accepted an unexpected name {name:?}"));
    }
    pass(&format!("server: accepted {name}"));
    let (data, fds) = conn.recv().map_err(e("recv ping"))?;
    let fd = one_fd(&data, fds, b"ping from client")?;
    let mut theirs = SharedMemory::map(fd, SHM_SIZE).map_err(e("map the client's buffer"))?;
    expect_cstr(theirs.as_slice(), 0, "client-shm", "the client's buffer")?;
    put_cstr(theirs.as_mut_slice(), 100, "server-saw-it");
    pass("server: got ping and the client's shared memory");
    let mut mine = wl.alloc(SHM_SIZE).map_err(e("alloc"))?;
    put_cstr(mine.as_mut_slice(), 0, "server-shm");
    conn.send(b"pong from server", &[mine.fd()])
        .map_err(e("send pong"))?;
    let (bye, _) = conn.recv().map_err(e("recv bye"))?;
    if bye != b"bye" {
        return Err(format!(
            "expected bye, got {:?}",
            String::from_utf8_lossy(&bye)
        ));
    }
    // The client wrote into our buffer before it sent "bye".
    expect_cstr(
        mine.as_slice(),
        200,
        "client-wrote-server-shm",
        "our buffer after the client's write",
    )?;
    Ok("PASS wl-faux server: data and shared memory both ways with the client".into())
}

/// The client guest: connects to "svc" (the relay) and talks to the server guest.
pub fn client() -> Res {
    let wl = Wl::open().map_err(e("open /dev/wl0"))?;
    let conn = wl.connect("svc").map_err(e("connect to svc"))?;
    pass("client: connected to \"svc\"");
    let mut mine = wl.alloc(SHM_SIZE).map_err(e("alloc"))?;
    put_cstr(mine.as_mut_slice(), 0, "client-shm");
    conn.send(b"ping from client", &[mine.fd()])
        .map_err(e("send ping"))?;
    let (data, fds) = conn.recv().map_err(e("recv pong"))?;
    let fd = one_fd(&data, fds, b"pong from server")?;
    pass("client: got pong and the server's shared memory");
    // The server wrote into our buffer before it answered.
    expect_cstr(
        mine.as_slice(),
        100,
        "server-saw-it",
        "our buffer after the server's write",
    )?;
    let mut theirs = SharedMemory::map(fd, SHM_SIZE).map_err(e("map the server's buffer"))?;
    expect_cstr(theirs.as_slice(), 0, "server-shm", "the server's buffer")?;
    put_cstr(theirs.as_mut_slice(), 200, "client-wrote-server-shm");
    conn.send(b"bye", &[]).map_err(e("send bye"))?;
    Ok("PASS wl-faux client: data and shared memory both ways with the server".into())
}

fn bind(path: &str) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|err| format!("bind {path}: {err}"))
}

/// Connects to the VMM's control socket, waiting for the VMM to create it (it starts as a
/// service next to us); `fd=N` is a connected SOCK_SEQPACKET socketpair end init handed over
/// (the jailed VMM's `--control-fd`): requests wait in it until the VMM reads them.
fn control(ctl: &str) -> Result<Channel, String> {
    if let Some(fd) = inherited_fd(ctl) {
        return Ok(Channel::from_fd(fd?));
    }
    let mut last = String::new();
    for _ in 0..1200 {
        match Channel::connect(Path::new(ctl)) {
            Ok(c) => return Ok(c),
            Err(err) => last = err.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("control socket {ctl}: {last}"))
}

fn wl_add(
    chan: &Channel,
    name: &str,
    path: Option<PathBuf>,
    fd: Option<BorrowedFd<'_>>,
) -> Result<String, String> {
    let req = ControlRequest::WlAdd {
        name: name.into(),
        path,
    };
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    chan.send(&req, &fds).map_err(e("send wl add"))?;
    match chan.recv::<ControlResponse>().map_err(e("recv wl add"))? {
        (ControlResponse::WlAdded(chosen), _) => Ok(chosen),
        (other, _) => Err(format!("wl add {name}: {other:?}")),
    }
}

/// Where a guest's connection comes from: a socket we listen on, or (`fd=N`) the connected
/// socketpair end init handed over, whose other end is a jailed VMM's `--wl-socket-fd`.
enum Incoming {
    Listening(UnixListener),
    Connected(UnixStream),
}

impl Incoming {
    fn open(arg: &str) -> Result<Incoming, String> {
        match inherited_fd(arg) {
            Some(fd) => Ok(Incoming::Connected(UnixStream::from(fd?))),
            None => Ok(Incoming::Listening(bind(arg)?)),
        }
    }

    /// The connection, if it has come (never waits).
    fn ready(&mut self) -> Result<Option<UnixStream>, String> {
        match self {
            Incoming::Connected(_) => Ok(None),
            Incoming::Listening(l) => {
                l.set_nonblocking(true).map_err(e("nonblocking"))?;
                let r = match l.accept() {
                    Ok((conn, _)) => Ok(Some(conn)),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    Err(err) => Err(format!("accept: {err}")),
                };
                l.set_nonblocking(false).map_err(e("blocking"))?;
                r
            }
        }
    }

    /// The connection (waits for it on a listening socket).
    fn accept(self) -> Result<UnixStream, String> {
        match self {
            Incoming::Connected(s) => Ok(s),
            Incoming::Listening(l) => Ok(l.accept().map_err(e("accept"))?.0),
        }
    }
}

fn send_with_fds(to: BorrowedFd<'_>, data: &[u8], fds: &[OwnedFd]) -> Result<(), String> {
    let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    let n = sendmsg::<()>(
        to.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(e("sendmsg"))?;
    if n != data.len() {
        return Err(format!("short sendmsg: {n} of {}", data.len()));
    }
    Ok(())
}

/// Relays messages with their fds between `a` and `b` until one side ends. Returns the fds
/// carried each way.
fn relay(a: &UnixStream, b: &UnixStream) -> Result<[usize; 2], String> {
    let mut fds_moved = [0usize; 2];
    loop {
        let mut polls = [
            PollFd::new(a.as_fd(), PollFlags::POLLIN),
            PollFd::new(b.as_fd(), PollFlags::POLLIN),
        ];
        poll(&mut polls, PollTimeout::NONE).map_err(e("poll"))?;
        let ready: Vec<bool> = polls
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        for (i, (from, to)) in [(a, b), (b, a)].into_iter().enumerate() {
            if !ready.get(i).copied().unwrap_or(false) {
                continue;
            }
            let (data, fds) = recv_with_fds(from.as_raw_fd())?;
            if data.is_empty() && fds.is_empty() {
                return Ok(fds_moved);
            }
            if let Some(n) = fds_moved.get_mut(i) {
                *n += fds.len();
            }
            send_with_fds(to.as_fd(), &data, &fds)?;
        }
    }
}

/// The L1 relay: the hub's part of the faux accept. Each argument is a path (a socket we
/// listen on, the VMM's control socket) or `fd=N`, a socketpair end init handed over (the
/// jailed VMMs' `--wl-socket-fd` and `--control-fd`).
pub fn relay_main(listen: &str, svc: &str, ctl: &str) -> Res {
    let mut listen_sock = Incoming::open(listen)?;
    let svc_sock = Incoming::open(svc)?;
    println!("testprog: wl-faux-relay serving {listen} and {svc}");
    let chan = control(ctl)?;
    // `wl add` is answered however far the server VM has got (typically it is still
    // booting: its guest has not connected its listener, nor activated the device).
    let early = wl_add(
        &chan,
        "early-%d",
        Some("/run/wl-faux-unused.sock".into()),
        None,
    )?;
    let already = listen_sock.ready()?;
    if early != "early-0" {
        return Err(format!("early wl add chose {early:?}"));
    }
    pass(&format!(
        "relay: early wl add answered {early}{}",
        if already.is_none() {
            " (before the server guest connected its listener)"
        } else {
            ""
        }
    ));
    let mut listener_conn = match already {
        Some(conn) => conn,
        None => listen_sock
            .accept()
            .map_err(|m| format!("the listener: {m}"))?,
    };
    pass("relay: the server guest's listener context connected");
    let client = svc_sock.accept().map_err(|m| format!("the client: {m}"))?;
    pass("relay: the client guest connected to svc");
    let (ours, theirs) = UnixStream::pair().map_err(e("socketpair"))?;
    let name = wl_add(&chan, "wl-conn-%d", None, Some(theirs.as_fd()))?;
    drop(theirs);
    if name != "wl-conn-0" {
        return Err(format!("wl add chose {name:?}, expected wl-conn-0"));
    }
    pass(&format!("relay: wl add on the server VMM answered {name}"));
    listener_conn
        .write_all(format!("{name}\n").as_bytes())
        .map_err(e("write the name on the listener"))?;
    let [to_server, to_client] = relay(&client, &ours)?;
    if to_server != 1 || to_client != 1 {
        return Err(format!(
            "relayed {to_server} fds to the server and {to_client} to the client, expected 1 and 1"
        ));
    }
    Ok(format!(
        "PASS wl-faux relay: relayed {to_server} fd to the server and {to_client} to the client"
    ))
}
