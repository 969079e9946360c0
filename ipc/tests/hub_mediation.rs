//! No raw socket crosses between VMs: a socket in a send becomes a hub-mediated connection
//! whose sends are checked under the `socket` rights of the grant (`send`, `recv`,
//! `send-fds`), and a hub connection's own end never reaches another VM. Against a real
//! hub process (see `common`).

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use bulkhead_ipc::channel::Channel;
use bulkhead_ipc::hub::protocol::{ConnEvent, FdInfo, HubEvent, Refusal};
use bulkhead_policy::{FdType, Rights};
use common::*;
use nix::sys::socket::{getsockopt, sockopt, SockType};

/// B (client) passes sockets to A (provider), and A's sends over them go back toward B
/// (s2c): with send-fds, read-only memfds only.
const MED: &str = "version 1
grant a provide socks c2s=socket:send+recv+send-fds+transfer,memfd:ro s2c=memfd:ro max-fds=8
grant b connect socks@a
grant c provide secret c2s=memfd:ro max-fds=8
grant b connect secret@c
grant @any quota shm=64KiB shm-count=4 vfds=32
";

fn ino(f: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(f).unwrap().st_ino
}

/// What A got for a socket: one fd, typed a socket with `rights`.
fn one_socket(infos: &[FdInfo], mut fds: Vec<OwnedFd>, rights: Rights) -> OwnedFd {
    assert_eq!(infos.len(), 1);
    assert_eq!(
        (infos[0].fd_type, infos[0].rights),
        (FdType::Socket, rights)
    );
    fds.pop().unwrap()
}

/// P (the program at the other end of B's socket) has nothing to read.
fn nothing_to_read(p: &UnixStream) {
    p.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    match (&*p).read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("P read {other:?}"),
    }
    p.set_nonblocking(false).unwrap();
}

/// B hands A one end of a stream socket whose other end (P) B keeps. A does not get that
/// socket: it gets its end of a new hub connection. A raw write on it is a bad frame (P
/// sees nothing); a send reaches P as plain bytes; with send-fds a read-only memfd goes too
/// (and arrives read-only); what P writes comes to A as deliveries, its fds checked as a
/// transfer from B; and an fd the grant does not allow from P's side closes the mediated
/// socket (A reads EOF) instead of reaching A.
#[test]
fn a_socket_handed_across_is_mediated() {
    let mut h = TestHub::start(MED, &["a", "b"], &[]);
    h.provide("a", "socks");
    let (_, b_to_a, a_from_b) = h.connect("b", "socks", "a").unwrap();
    let (x, p) = UnixStream::pair().unwrap();
    let all = Rights::SEND | Rights::RECV | Rights::SEND_FDS;
    send(&b_to_a, 1, &[(x.as_fd(), all)]);
    b_to_a.expect_accepted(1);
    let (infos, fds) = expect_deliver(&a_from_b, 1);
    let at_a = one_socket(&infos, fds, all);
    // Not the socket B sent, and not a byte stream: a hub connection.
    assert_ne!(ino(at_a.as_fd()), ino(x.as_fd()));
    assert_eq!(
        getsockopt(&at_a, sockopt::SockType).unwrap(),
        SockType::SeqPacket
    );
    let a = Peer::new(Channel::from_fd(at_a));
    timeout(&a);
    // Raw bytes written straight into it are not a frame: refused; P gets nothing.
    nix::unistd::write(&a.ch, b"GET / HTTP/1.0\r\n").unwrap();
    expect_refused(&a, 0, Refusal::InvalidArgs);
    nothing_to_read(&p);
    // A send: P gets its bytes, nothing else.
    send(&a, 2, &[]);
    a.expect_accepted(2);
    let mut got = [0u8; 4];
    (&p).read_exact(&mut got).unwrap();
    assert_eq!(got, 2u32.to_le_bytes());
    // A read-only memfd (s2c allows memfd:ro): P gets it as an O_RDONLY description.
    let m = memfd();
    send(&a, 3, &[(m.as_fd(), RO)]);
    a.expect_accepted(3);
    let mut buf = [0u8; 4];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 2]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let r = nix::sys::socket::recvmsg::<()>(
        p.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap();
    let mut pfds = Vec::new();
    for c in r.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(v) = c {
            pfds.extend(v);
        }
    }
    assert_eq!((r.bytes, pfds.len()), (4, 1));
    // SAFETY: F_GETFL on the fd just received.
    let fl = unsafe { libc::fcntl(pfds[0], libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    // SAFETY: closing the fd just received, owned by nobody else.
    unsafe { libc::close(pfds[0]) };
    // A pipe end is not in what the grant lets go toward B: refused, P gets nothing.
    let (_pr, pw) = nix::unistd::pipe().unwrap();
    send(&a, 4, &[(pw.as_fd(), Rights::WRITE)]);
    expect_refused(&a, 4, Refusal::PermissionDenied);
    nothing_to_read(&p);
    // P writes: A gets it.
    (&p).write_all(b"pong").unwrap();
    match a.next().unwrap() {
        (ConnEvent::Deliver { data, fds }, f) => {
            assert_eq!(data, b"pong");
            assert!(fds.is_empty() && f.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // P sends a pipe end, which nothing grants from B's side: the mediated socket closes.
    let (_r, w) = nix::unistd::pipe().unwrap();
    let iov = [std::io::IoSlice::new(b"p")];
    let raw = [w.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        p.as_raw_fd(),
        &iov,
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(expect_closed(&a)
        .iter()
        .all(|e| !matches!(e, ConnEvent::Deliver { .. })));
    let audit = h.audit_lines();
    assert!(
        audit.iter().any(|r| r["allowed"] == false
            && r["obj"].as_str().unwrap().contains("mediated socket")
            && r["reason"].as_str().unwrap().contains("closed")),
        "{audit:?}"
    );
}

/// The socket rights of the grant decide: without `send` a send is refused, without
/// `send-fds` a send with fds is, without `recv` nothing P writes is read by the hub.
#[test]
fn socket_rights_are_enforced_on_the_mediated_connection() {
    let mut h = TestHub::start(MED, &["a", "b"], &[]);
    h.provide("a", "socks");
    let (_, b_to_a, a_from_b) = h.connect("b", "socks", "a").unwrap();
    let (x, p) = UnixStream::pair().unwrap();
    send(&b_to_a, 1, &[(x.as_fd(), Rights::RECV)]);
    let (infos, fds) = expect_deliver(&a_from_b, 1);
    let a = Peer::new(Channel::from_fd(one_socket(&infos, fds, Rights::RECV)));
    timeout(&a);
    send(&a, 2, &[]);
    expect_refused(&a, 2, Refusal::PermissionDenied);
    nothing_to_read(&p);
    (&p).write_all(b"in").unwrap();
    match a.next().unwrap().0 {
        ConnEvent::Deliver { data, .. } => assert_eq!(data, b"in"),
        other => panic!("{other:?}"),
    }

    let (y, q) = UnixStream::pair().unwrap();
    send(&b_to_a, 3, &[(y.as_fd(), Rights::SEND)]);
    let (infos, fds) = expect_deliver(&a_from_b, 3);
    let a2 = Peer::new(Channel::from_fd(one_socket(&infos, fds, Rights::SEND)));
    timeout(&a2);
    let m = memfd();
    send(&a2, 4, &[(m.as_fd(), RO)]);
    expect_refused(&a2, 4, Refusal::PermissionDenied);
    nothing_to_read(&q);
    send(&a2, 5, &[]);
    a2.expect_accepted(5);
    let mut got = [0u8; 4];
    (&q).read_exact(&mut got).unwrap();
    assert_eq!(got, 5u32.to_le_bytes());
    // Without recv the hub leaves what Q writes where it is (B may still read it).
    (&q).write_all(b"stays").unwrap();
    send(&a2, 6, &[]);
    a2.expect_accepted(6);
    nothing_pending(&a2);
    let mut stays = [0u8; 5];
    (&y).read_exact(&mut stays).unwrap();
    assert_eq!(&stays, b"stays");
    let audit = h.audit_lines();
    assert!(audit.iter().any(|r| r["reason"]
        .as_str()
        .is_some_and(|s| s.contains("lack send-fds"))));
}

/// Another connection's end never reaches a VM: B's end of its `secret` connection (A has
/// no grant for `secret`), sent to A over `socks`, is refused (InvalidId) and A gets
/// nothing; so is a seqpacket socket made by whoever made the VM channels (it may be one).
#[test]
fn another_connections_end_never_reaches_a_vm_without_a_grant() {
    let mut h = TestHub::start(MED, &["a", "b", "c"], &[]);
    h.provide("a", "socks");
    h.provide("c", "secret");
    let (_, b_to_a, a_from_b) = h.connect("b", "socks", "a").unwrap();
    let (_, b_to_c, _c_from_b) = h.connect("b", "secret", "c").unwrap();
    let all = Rights::SEND | Rights::RECV;
    send(&b_to_a, 1, &[(b_to_c.as_fd(), all)]);
    expect_refused(&b_to_a, 1, Refusal::InvalidId);
    let (s1, _s2) = Channel::pair().unwrap();
    send(&b_to_a, 2, &[(s1.as_fd(), all)]);
    expect_refused(&b_to_a, 2, Refusal::PermissionDenied);
    nothing_pending(&a_from_b);
    let audit = h.audit_lines();
    assert!(audit.iter().any(|r| r["reason"]
        .as_str()
        .is_some_and(|s| s.contains("hub connection"))));
}

/// `v ≠ c`: a connection's own socket (either VMM-side end) is never carried over that
/// connection, even when the contract passes sockets: InvalidId, the send refused whole;
/// another socket passes (mediated).
#[test]
fn a_connection_socket_over_itself_is_invalid_id() {
    let mut h = TestHub::start(MED, &["a", "b"], &[]);
    h.provide("a", "socks");
    let (_, b_to_a, a_from_b) = h.connect("b", "socks", "a").unwrap();
    send(&b_to_a, 1, &[(b_to_a.as_fd(), Rights::SEND)]);
    expect_refused(&b_to_a, 1, Refusal::InvalidId);
    let (s1, _s2) = UnixStream::pair().unwrap();
    send(
        &b_to_a,
        3,
        &[(s1.as_fd(), Rights::SEND), (b_to_a.as_fd(), Rights::SEND)],
    );
    expect_refused(&b_to_a, 3, Refusal::InvalidId);
    send(&b_to_a, 4, &[(s1.as_fd(), Rights::SEND)]);
    let (infos, _) = expect_deliver(&a_from_b, 4);
    assert_eq!(infos[0].fd_type, FdType::Socket);
    nothing_pending(&a_from_b);
    let denied: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|r| r["allowed"] == false && r["verb"] == "transfer")
        .collect();
    assert!(
        denied
            .iter()
            .all(|r| r["reason"].as_str().unwrap().contains("own socket")),
        "{denied:?}"
    );
}

/// A mediated socket's own end cannot be passed on either (not even back to the VM that
/// passed the socket), and when every fd is closed the hub holds no more fds than before.
#[test]
fn a_mediated_socket_is_not_passed_on_and_leaves_nothing() {
    let mut h = TestHub::start(MED, &["a", "b"], &[]);
    h.provide("a", "socks");
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "socks");
    let before = h.hub_fds_quiet();
    let (c1, b_to_a, a_from_b) = h.connect("b", "socks", "a").unwrap();
    let (x, p) = UnixStream::pair().unwrap();
    send(&b_to_a, 1, &[(x.as_fd(), Rights::SEND | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&a_from_b, 1);
    assert_eq!(infos[0].fd_type, FdType::Socket);
    let at_a = fds.pop().unwrap();
    // Back over the connection (s2c passes no sockets anyway: the end is refused first).
    send(&a_from_b, 2, &[(at_a.as_fd(), Rights::SEND)]);
    expect_refused(&a_from_b, 2, Refusal::InvalidId);
    nothing_pending(&b_to_a);
    drop((x, p, at_a, b_to_a, a_from_b));
    for vm in ["a", "b"] {
        match h.vm(vm).recv::<HubEvent>().unwrap().0 {
            HubEvent::Closed { conn, .. } => assert_eq!(conn, c1),
            other => panic!("{other:?}"),
        }
    }
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "socks");
    assert_eq!(h.hub_fds_quiet(), before);
}
