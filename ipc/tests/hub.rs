//! The hub as a real process (the `bulkhead-hub` binary, channels inherited as `--vm
//! NAME=FD`), driven from this process acting as the VMMs, with real memfds, pipes and
//! sockets. These are policy.md's adversarial tests that do not need guests.

mod common;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::frame;
use bulkhead_ipc::hub::protocol::{ConnEvent, ConnSend, HubEvent, Refusal, VmRequest};
use bulkhead_policy::control::{Request, Response};
use bulkhead_policy::{FdType, PolicyTree, Rights, RootDir};
use common::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// B gives A a read-only memfd with TRANSFER; A forwards it to C: asking for write is
/// InvalidArgs and C gets nothing; asking read-only works and C gets no TRANSFER.
#[test]
fn forwarding_readonly_memfd_asking_for_write_is_invalid_args() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    assert!(matches!(h.provide("a", "inbox"), HubEvent::Provided { .. }));
    assert!(matches!(h.provide("c", "sink"), HubEvent::Provided { .. }));
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, a_to_c, c_from_a) = h.connect("a", "sink", "c").unwrap();
    let (shm, _) = h.alloc("b", 4096).unwrap();

    send(&b_to_a, 1, &[(shm.as_fd(), RO | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&a_from_b, 1);
    assert_eq!(infos[0].fd_type, FdType::Memfd);
    assert_eq!(infos[0].rights, RO | Rights::TRANSFER);
    let at_a = fds.pop().unwrap();

    // A got a read-only description: the kernel refuses writes and shared writable maps.
    // SAFETY: F_GETFL only reads flags.
    let fl = unsafe { libc::fcntl(at_a.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    assert!(nix::unistd::write(&at_a, b"x").is_err());
    // SAFETY: mmap of 4096 bytes of a valid fd at offset 0; the result is checked and unmapped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            at_a.as_raw_fd(),
            0,
        )
    };
    assert_eq!(
        p,
        libc::MAP_FAILED,
        "writable shared mapping of a read-only memfd"
    );
    // The memfd server's charge to B lasts while only A's read-only copy is open.
    drop(shm);
    let _kept: Vec<_> = (0..3).map(|_| h.alloc("b", 16 * 1024).unwrap()).collect();
    assert_eq!(h.alloc("b", 1).unwrap_err(), Refusal::OutOfMemory);

    send(&a_to_c, 2, &[(at_a.as_fd(), RO | Rights::WRITE)]);
    expect_refused(&a_to_c, 2, Refusal::InvalidArgs);
    send(&a_to_c, 3, &[(at_a.as_fd(), RO)]);
    let (infos, _) = expect_deliver(&c_from_a, 3); // frame 2 never reached C
    assert_eq!(infos[0].rights, RO);
    assert!(!infos[0].rights.contains(Rights::TRANSFER));

    let denied: Vec<_> = h
        .audit_lines()
        .into_iter()
        .filter(|r| r["allowed"] == false && r["verb"] == "transfer")
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["src"], "a");
    assert!(denied[0]["reason"].as_str().unwrap().contains("exceeds"));
}

/// What the receiving child of `readonly_memfds_cannot_be_reopened_writable_by_another_uid`
/// does after fork: drop to uid/gid 65534, receive one delivery on `sock`, and for each of
/// its `nfds` fds check that a reopen through /proc/self/fd for writing fails with EACCES
/// while one for reading works, and that the fd itself refuses writes. Only raw system
/// calls (the test process has other threads); the exit code says what failed.
fn reopen_as_another_uid(sock: RawFd, nfds: usize) -> i32 {
    // SAFETY: plain system calls on this (single-threaded, forked) process's own fds and
    // stack buffers, each result checked; nothing allocates.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            return 10;
        }
        if libc::syscall(libc::SYS_setgid, 65534) != 0 {
            return 11;
        }
        if libc::syscall(libc::SYS_setuid, 65534) != 0 || libc::geteuid() != 65534 {
            return 12;
        }
        let mut data = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 64];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        if libc::recvmsg(sock, &mut msg, 0) <= 0 {
            return 13;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return 14;
        }
        let n = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
        if n != nfds {
            return 15;
        }
        let fds = libc::CMSG_DATA(cmsg) as *const RawFd;
        for i in 0..n {
            let fd = fds.add(i).read_unaligned();
            // "/proc/self/fd/<fd>\0" without allocating.
            let mut path = [0u8; 40];
            let prefix = b"/proc/self/fd/";
            path[..prefix.len()].copy_from_slice(prefix);
            let mut digits = [0u8; 12];
            let (mut v, mut d) = (fd as u32, 0);
            loop {
                digits[d] = b'0' + (v % 10) as u8;
                d += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            for k in 0..d {
                path[prefix.len() + k] = digits[d - 1 - k];
            }
            let p = path.as_ptr().cast::<libc::c_char>();
            if libc::open(p, libc::O_RDWR | libc::O_CLOEXEC) >= 0 {
                return 20 + i as i32;
            }
            if *libc::__errno_location() != libc::EACCES {
                return 30 + i as i32;
            }
            if libc::open(p, libc::O_RDONLY | libc::O_CLOEXEC) < 0 {
                return 40 + i as i32;
            }
            if libc::write(fd, b"x".as_ptr().cast(), 1) >= 0 {
                return 50 + i as i32;
            }
        }
        0
    }
}

/// A read-only delivery stays read-only in a receiver of another, unprivileged uid: the
/// memfd server's memfd and a VMM's (both mode 0644) reach a child that setuid()s away from
/// root; reopening either through /proc/self/fd for writing fails with EACCES, for reading
/// works. (A root receiver bypasses DAC: that is why VMMs run unprivileged.)
#[test]
fn readonly_memfds_cannot_be_reopened_writable_by_another_uid() {
    let mut h = TestHub::start(POLICY, &["b", "d"], &[]);
    h.provide("d", "noxfer");
    let (_, b_to_d, d_from_b) = h.connect("b", "noxfer", "d").unwrap();
    let (shm, _) = h.alloc("b", 4096).unwrap();
    let own = memfd();
    let sock = d_from_b.as_raw_fd();
    // SAFETY: the child only makes raw system calls (`reopen_as_another_uid`) and _exits.
    let pid = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let code = reopen_as_another_uid(sock, 2);
            // SAFETY: leaving the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    send(&b_to_d, 1, &[(shm.as_fd(), RO), (own.as_fd(), RO)]);
    let status = nix::sys::wait::waitpid(pid, None).unwrap();
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(pid, 0),
        "child exit codes: 2x reopened writable, 3x other errno, 4x no read-only reopen, \
         5x write went through"
    );
}

/// Objects a receiver could reopen writable, or that are only a handle to reopen, are
/// refused whole: a memfd group or others may write, an O_PATH descriptor.
#[test]
fn writable_by_others_and_o_path_are_refused() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let wide = memfd();
    nix::sys::stat::fchmod(&wide, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    send(&b_to_a, 1, &[(wide.as_fd(), RO)]);
    expect_refused(&b_to_a, 1, Refusal::PermissionDenied);
    let m = memfd();
    let path = nix::fcntl::open(
        format!("/proc/self/fd/{}", m.as_raw_fd()).as_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    send(&b_to_a, 2, &[(path.as_fd(), Rights::READ)]);
    expect_refused(&b_to_a, 2, Refusal::PermissionDenied);
    send(&b_to_a, 3, &[(m.as_fd(), RO)]);
    expect_deliver(&a_from_b, 3);
}

/// D received a memfd without TRANSFER (the noxfer contract); forwarding it is refused.
#[test]
fn forwarding_without_transfer_is_refused() {
    let mut h = TestHub::start(POLICY, &["b", "c", "d"], &[]);
    h.provide("d", "noxfer");
    h.provide("c", "sink");
    let (_, b_to_d, d_from_b) = h.connect("b", "noxfer", "d").unwrap();
    let (_, d_to_c, c_from_d) = h.connect("d", "sink", "c").unwrap();
    let m = memfd();
    send(&b_to_d, 1, &[(m.as_fd(), RO | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&d_from_b, 1);
    assert_eq!(infos[0].rights, RO, "TRANSFER is dropped unless granted");
    let got = fds.pop().unwrap();
    send(&d_to_c, 2, &[(got.as_fd(), RO)]);
    expect_refused(&d_to_c, 2, Refusal::PermissionDenied);
    // D's own fresh memfd is fine (D is its origin).
    let own = memfd();
    send(&d_to_c, 3, &[(own.as_fd(), RO)]);
    expect_deliver(&c_from_d, 3);
}

/// One fd of a type the contract lacks rejects the whole frame.
#[test]
fn disallowed_type_in_an_otherwise_fine_frame_rejects_all() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let m = memfd();
    let (s1, _s2) = Channel::pair().unwrap();
    send(&b_to_a, 1, &[(m.as_fd(), RO), (s1.as_fd(), Rights::SEND)]);
    expect_refused(&b_to_a, 1, Refusal::PermissionDenied);
    // The connection's own socket over itself: `v ≠ c` comes first (step 1, InvalidId),
    // before the type check would refuse any socket here.
    send(&b_to_a, 2, &[(b_to_a.as_fd(), Rights::SEND)]);
    expect_refused(&b_to_a, 2, Refusal::InvalidId);
    // A pipe read end asked to carry write.
    let (r, w) = nix::unistd::pipe().unwrap();
    send(&b_to_a, 3, &[(r.as_fd(), Rights::WRITE)]);
    expect_refused(&b_to_a, 3, Refusal::InvalidArgs);
    // Same object twice.
    send(&b_to_a, 4, &[(m.as_fd(), RO), (m.as_fd(), RO)]);
    expect_refused(&b_to_a, 4, Refusal::InvalidId);
    send(&b_to_a, 5, &[(m.as_fd(), RO), (w.as_fd(), Rights::WRITE)]);
    let (infos, _) = expect_deliver(&a_from_b, 5);
    assert_eq!(infos[1].fd_type, FdType::Pipe);
    assert!(infos[1].write_end);
    nothing_pending(&a_from_b);
}

/// Memfds both ways (policy.md's re-sending test).
const ECHO: &str = "version 1
grant a provide echo c2s=memfd:rw+transfer+dup s2c=memfd:rw+transfer+dup max-fds=8
grant b connect echo@a
grant @any quota shm=64KiB shm-count=4 vfds=32
grant e quota shm=8GiB shm-count=4 vfds=32
";

/// A sends a read-only buffer to B, B sends it back to A: asking for write on the way back
/// is InvalidArgs, and what A gets back is still at most read-only (rights and a read-only
/// description), though A is the buffer's origin.
#[test]
fn a_readonly_buffer_sent_back_to_its_origin_stays_readonly() {
    let mut h = TestHub::start(ECHO, &["a", "b"], &[]);
    h.provide("a", "echo");
    let (_, b_to_a, a_from_b) = h.connect("b", "echo", "a").unwrap();
    let m = memfd();
    send(&a_from_b, 1, &[(m.as_fd(), RO | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&b_to_a, 1);
    assert_eq!(infos[0].rights, RO | Rights::TRANSFER);
    let at_b = fds.pop().unwrap();
    send(&b_to_a, 2, &[(at_b.as_fd(), RO | Rights::WRITE)]);
    expect_refused(&b_to_a, 2, Refusal::InvalidArgs);
    send(&b_to_a, 3, &[(at_b.as_fd(), RO | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&a_from_b, 3);
    assert!(infos[0].rights.is_subset_of(RO | Rights::TRANSFER));
    assert!(!infos[0].rights.contains(Rights::WRITE));
    let back = fds.pop().unwrap();
    // SAFETY: F_GETFL only reads flags.
    let fl = unsafe { libc::fcntl(back.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(fl & libc::O_ACCMODE, libc::O_RDONLY);
    assert!(nix::unistd::write(&back, b"x").is_err());
}

/// u32::MAX bytes from the memfd server: over a 64 KiB quota it is refused (OutOfMemory)
/// and the hub carries on; under an 8 GiB one it is a 4 GiB (page-rounded) sealed memfd.
#[test]
fn memfd_server_u32_max_allocation() {
    let mut h = TestHub::start(ECHO, &["a", "e"], &[]);
    let size = u64::from(u32::MAX);
    assert_eq!(h.alloc("a", size).unwrap_err(), Refusal::OutOfMemory);
    let (fd, got) = h.alloc("e", size).unwrap();
    assert_eq!(got, 1 << 32);
    assert_eq!(nix::sys::stat::fstat(fd.as_fd()).unwrap().st_size, 1 << 32);
    assert!(nix::unistd::ftruncate(&fd, 1).is_err(), "sealed");
    drop(fd);
    let (_, small) = h.alloc("a", 1).unwrap();
    assert_eq!(small, 4096);
}

/// 29 fds cannot even arrive (MSG_CTRUNC at the hub); 9 is over max-fds=8. Both are refused
/// with nothing delivered and nothing leaked in the hub.
#[test]
fn twenty_nine_fds_and_max_fds_plus_one() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    h.provide("a", "inbox"); // round trip: the hub is done with the connect
    let before = h.hub_fds_quiet();
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..29).map(|_| nix::unistd::pipe().unwrap()).collect();
    let raw: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
    let bytes = frame::encode(&ConnSend {
        seq: 1,
        data: vec![],
        rights: heapless::Vec::new(),
        part: 0,
        more: false,
    })
    .unwrap();
    let iov = [std::io::IoSlice::new(&bytes)];
    sendmsg::<()>(
        b_to_a.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    expect_refused(&b_to_a, 0, Refusal::InvalidArgs);
    let nine: Vec<(BorrowedFd<'_>, Rights)> = pipes
        .iter()
        .take(9)
        .map(|(_, w)| (w.as_fd(), Rights::WRITE))
        .collect();
    send(&b_to_a, 2, &nine);
    expect_refused(&b_to_a, 2, Refusal::InvalidArgs);
    send(&b_to_a, 3, &nine[..8]);
    let (_, fds) = expect_deliver(&a_from_b, 3);
    assert_eq!(fds.len(), 8);
    // A round trip on the VM channel: the hub has finished with the frame before this.
    h.provide("a", "inbox");
    assert_eq!(h.hub_fds_quiet(), before, "hub leaked fds");
}

/// Connection ids that are not the VM's get InvalidId and change nothing.
#[test]
fn guessed_connection_ids_are_invalid() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let (_, _b_to_a, _a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (ac, a_to_c, c_from_a) = h.connect("a", "sink", "c").unwrap();
    for conn in [ac, 0, 999, u32::MAX] {
        let tag = h.next_tag();
        let (ev, _) = h.request("b", VmRequest::Close { tag, conn });
        assert_eq!(
            ev,
            HubEvent::Refused {
                tag,
                error: Refusal::InvalidId
            }
        );
    }
    let m = memfd();
    send(&a_to_c, 1, &[(m.as_fd(), RO)]);
    expect_deliver(&c_from_a, 1);
    // A memfd the hub knows (B's) that A never received: InvalidId.
    h.provide("a", "inbox");
    let (shm, _) = h.alloc("b", 1).unwrap();
    send(&a_to_c, 2, &[(shm.as_fd(), RO)]);
    expect_refused(&a_to_c, 2, Refusal::InvalidId);
}

/// memfd server sizes 0, PAGE-1, u64::MAX, and many small ones against shm-count=4.
#[test]
fn memfd_server_quota_sizes() {
    let mut h = TestHub::start(POLICY, &["a", "e"], &[]);
    let page = 4096u64;
    assert_eq!(h.alloc("a", 0).unwrap_err(), Refusal::InvalidArgs);
    assert_eq!(h.alloc("a", u64::MAX).unwrap_err(), Refusal::InvalidArgs);
    assert_eq!(
        h.alloc("a", 64 * 1024 + 1).unwrap_err(),
        Refusal::OutOfMemory
    );
    let (first, size) = h.alloc("a", page - 1).unwrap();
    assert_eq!(size, page);
    let mut held = vec![first];
    for _ in 0..3 {
        held.push(h.alloc("a", 1).unwrap().0);
    }
    assert_eq!(h.alloc("a", 1).unwrap_err(), Refusal::OutOfMemory);
    // Another VM's quota is its own.
    let (_e, _) = h.alloc("e", 1).unwrap();
    // The charge stays while any holder has it (a dup here), and goes with the last one.
    let dup = held[0].try_clone().unwrap();
    held.remove(0);
    assert_eq!(h.alloc("a", 1).unwrap_err(), Refusal::OutOfMemory);
    drop(dup);
    let (_again, _) = h.alloc("a", 1).unwrap();
    // Sealed: cannot grow.
    assert!(nix::unistd::ftruncate(&held[0], 1 << 20).is_err());
    // A log query flushes coalesced repeats; each denial is counted exactly once.
    h.control(&Request::Log(Default::default()));
    let quota_denials: u64 = h
        .audit_lines()
        .iter()
        .filter(|r| r["verb"] == "quota")
        .map(|r| r["similar"].as_u64().unwrap().max(1)) // "+n similar" stands for n
        .sum();
    assert_eq!(quota_denials, 5);
}

/// A receiver that never reads: once its queue is full, sends toward it are refused
/// `Busy` (the sender hears it at once, nothing is half-sent); another pair is unaffected;
/// when the receiver drains, the sender hears `Ready`, and every accepted send arrives.
#[test]
fn receiver_that_never_reads_blocks_only_its_sender() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c", "d"], &["--queue", "8"]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, d_to_c, c_from_d) = h.connect("d", "sink", "c").unwrap();
    let mut accepted = Vec::new();
    let mut seq = 0u32;
    loop {
        send(&b_to_a, seq, &[]);
        match b_to_a.next_any().unwrap().0 {
            ConnEvent::Accepted { seq: s } => accepted.push(s),
            ConnEvent::Refused {
                seq: s,
                error: Refusal::Busy,
            } => {
                assert_eq!(s, seq);
                break;
            }
            other => panic!("{other:?}"),
        }
        seq += 1;
        assert!(seq < 1_000_000, "no back-pressure");
    }
    // Others are fine while A is stuck.
    let m = memfd();
    send(&d_to_c, 77, &[(m.as_fd(), RO)]);
    expect_deliver(&c_from_d, 77);
    // The hub still answers VM requests.
    assert!(matches!(h.provide("c", "sink"), HubEvent::Provided { .. }));
    for s in &accepted {
        expect_deliver(&a_from_b, *s);
    }
    nothing_pending(&a_from_b);
    // A drained: B hears Ready, and may send again.
    assert!(matches!(b_to_a.next_any().unwrap().0, ConnEvent::Ready));
    send(&b_to_a, seq + 1, &[]);
    b_to_a.expect_accepted(seq + 1);
    expect_deliver(&a_from_b, seq + 1);
}

/// Apply racing sends: each frame is decided by exactly one generation: delivered (old) or
/// refused (new), never lost; everything sent after the apply answer is refused.
#[test]
fn policy_reload_racing_a_send() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let new_dir = h.dir.path().join("new.d");
    std::fs::create_dir(&new_dir).unwrap();
    std::fs::write(
        new_dir.join("10-test.policy"),
        POLICY.replace("c2s=memfd:rw+transfer+dup,pipe:w+transfer", "c2s=pipe:w"),
    )
    .unwrap();
    let hash = PolicyTree::load(&RootDir::staging(&new_dir)).hash;
    let m = memfd();
    let total = 200u32;
    let b_chan: &Channel = &b_to_a;
    let sender = std::thread::scope(|s| {
        let t = s.spawn(|| {
            for seq in 0..100 {
                send(b_chan, seq, &[(m.as_fd(), RO)]);
            }
        });
        let r = h.control(&Request::Apply {
            tree_hash: hash.clone(),
            root: new_dir.clone(),
            if_match: None,
            revoke_live: false,
        });
        t.join().unwrap();
        r
    });
    match sender {
        Response::Applied(r) => assert_eq!(r.generation, 2),
        other => panic!("{other:?}"),
    }
    for seq in 100..total {
        send(&b_to_a, seq, &[(m.as_fd(), RO)]);
    }
    let mut delivered = Vec::new();
    let mut refused = Vec::new();
    // Refusals come back to B, deliveries go to A; wait on both (A must keep draining or
    // back-pressure would stall B's refusals).
    while delivered.len() + refused.len() < total as usize {
        let mut pfds = [
            libc::pollfd {
                fd: a_from_b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b_to_a.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; 60 s is a hang guard, not a timing assertion.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 60_000) };
        assert!(n > 0, "hub stalled");
        while let Some((ev, _)) = a_from_b.try_next() {
            match ev {
                ConnEvent::Deliver { data, .. } => {
                    delivered.push(u32::from_le_bytes(data[..4].try_into().unwrap()))
                }
                other => panic!("{other:?}"),
            }
        }
        while let Some((ev, _)) = b_to_a.try_next() {
            match ev {
                ConnEvent::Refused { seq, error } => {
                    assert_eq!(error, Refusal::PermissionDenied);
                    refused.push(seq);
                }
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(delivered.len() + refused.len(), total as usize);
    // Every delivered send was accepted, by a verdict to its sender.
    for seq in &delivered {
        b_to_a.expect_accepted(*seq);
    }
    assert!(
        delivered.iter().all(|s| *s < 100),
        "a frame sent after the apply was delivered"
    );
    assert!((100..total).all(|s| refused.contains(&s)));
    // Every decision names one generation; denials are generation 2.
    for r in h
        .audit_lines()
        .iter()
        .filter(|r| r["verb"] == "transfer" && r["allowed"] == false)
    {
        assert_eq!(r["generation"], 2);
    }
}

/// A VM with no grant and a VM asking for a service nobody provides see the same error;
/// the audit log says which (host only).
#[test]
fn denials_look_the_same_to_guests() {
    let mut h = TestHub::start(POLICY, &["a", "e"], &[]);
    h.provide("a", "inbox");
    let no_grant = h.connect("e", "inbox", "a").unwrap_err();
    let no_service = h.connect("e", "nosuch", "a").unwrap_err();
    let not_running = h.connect("a", "sink", "c").unwrap_err();
    assert_eq!(no_grant, Refusal::PermissionDenied);
    assert_eq!(no_grant, no_service);
    assert_eq!(no_grant, not_running);
    assert!(matches!(
        h.provide("e", "inbox"),
        HubEvent::Refused {
            error: Refusal::PermissionDenied,
            ..
        }
    ));
    let lines = h.audit_lines();
    let e_connects: Vec<_> = lines
        .iter()
        .filter(|r| r["src"] == "e" && r["verb"] == "connect")
        .collect();
    assert_eq!(e_connects.len(), 2);
    assert!(
        e_connects[0]["reason"]
            .as_str()
            .unwrap()
            .contains("NoGrant"),
        "{:?}",
        e_connects[0]
    );
    assert!(e_connects[1]["reason"]
        .as_str()
        .unwrap()
        .contains("NoProvider"));
}

/// Many connect/send/close cycles leave the hub's fd table as it was.
#[test]
fn hub_fd_count_is_stable() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, _warm, _warm_a) = h.connect("b", "inbox", "a").unwrap();
    h.provide("a", "inbox"); // round trip: the hub is done with the connect
                             // An allocation sweeps (dropping the hub's cached read-only descriptions) and leaves
                             // exactly one probe behind; do the same before both counts.
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox"); // round trip: the hub is done sending the memfd
    let before = h.hub_fds_quiet();
    for i in 0..20 {
        let (conn, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
        let m = memfd();
        send(&b_to_a, i, &[(m.as_fd(), RO)]);
        expect_deliver(&a_from_b, i);
        let tag = h.next_tag();
        let (ev, _) = h.request("b", VmRequest::Close { tag, conn });
        assert_eq!(ev, HubEvent::Closed { tag, conn });
        assert!(matches!(
            h.vm("a").recv::<HubEvent>().unwrap().0,
            HubEvent::Closed { .. }
        ));
        assert_eq!(expect_closed(&b_to_a), vec![ConnEvent::Accepted { seq: i }]);
    }
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    assert_eq!(h.hub_fds_quiet(), before);
}

/// 200 restarts (`Hello`) of a VM that provides a service, is connected to and receives a
/// memfd each time: the hub's fd count comes back to what it was (P6, start/stop cycles).
#[test]
fn two_hundred_hello_cycles_keep_the_hub_fd_count() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    let cycle = |h: &mut TestHub, i: u32| {
        assert!(matches!(h.provide("a", "inbox"), HubEvent::Provided { .. }));
        let (conn, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
        let m = memfd();
        send(&b_to_a, i, &[(m.as_fd(), RO)]);
        expect_deliver(&a_from_b, i);
        h.vm("a").send(&VmRequest::Hello, &[]).unwrap();
        for vm in ["a", "b"] {
            assert_eq!(
                h.vm(vm).recv::<HubEvent>().unwrap().0,
                HubEvent::Closed { tag: 0, conn }
            );
        }
    };
    cycle(&mut h, 0);
    drop(h.alloc("a", 1).unwrap());
    h.provide("b", "inbox"); // refused (no grant): a round trip all the same
    let before = h.hub_fds_quiet();
    for i in 1..=200 {
        cycle(&mut h, i);
    }
    drop(h.alloc("a", 1).unwrap());
    h.provide("b", "inbox");
    assert_eq!(h.hub_fds_quiet(), before);
}

/// The control socket: status, a bad apply keeps the generation and says why.
#[test]
fn control_socket_status_and_bad_apply() {
    let h = TestHub::start(POLICY, &["a"], &[]);
    let Response::Status(s) = h.control(&Request::Status) else {
        panic!()
    };
    assert_eq!(s.generation, 1);
    let bad = h.dir.path().join("bad.d");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("10-x.policy"), "version 1\ngrant a frobnicate\n").unwrap();
    let hash = PolicyTree::load(&RootDir::staging(&bad)).hash;
    let r = h.control(&Request::Apply {
        tree_hash: hash,
        root: bad,
        if_match: None,
        revoke_live: false,
    });
    let Response::Error { message } = r else {
        panic!("{r:?}")
    };
    assert!(message.contains("10-x.policy"), "{message}");
    let Response::Status(s) = h.control(&Request::Status) else {
        panic!()
    };
    assert_eq!(s.generation, 1);
    assert!(s.last_rejected.is_some());
    let Response::Log(batch) = h.control(&Request::Log(Default::default())) else {
        panic!()
    };
    assert!(batch
        .records
        .iter()
        .any(|r| r.verb == "apply" && !r.allowed));
    let _ = Path::new("");
}

/// A VM cannot open connections without bound (each costs the hub fds); others still can.
#[test]
fn per_vm_connection_limit() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c", "d"], &["--max-conns-per-vm", "3"]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let kept: Vec<_> = (0..3)
        .map(|_| h.connect("b", "inbox", "a").unwrap())
        .collect();
    assert_eq!(
        h.connect("b", "inbox", "a").unwrap_err(),
        Refusal::PermissionDenied
    );
    let (_, d_to_c, c_from_d) = h.connect("d", "sink", "c").unwrap();
    let m = memfd();
    send(&d_to_c, 1, &[(m.as_fd(), RO)]);
    expect_deliver(&c_from_d, 1);
    drop(kept);
}

/// A sender cannot grow the hub's handle table without bound with fresh objects: they
/// count against its own vfds quota.
#[test]
fn fresh_objects_count_against_the_senders_vfds() {
    let policy = format!("{POLICY}grant b quota vfds=4\n"); // the receiver keeps 32
    let mut h = TestHub::start(&policy, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..5).map(|_| nix::unistd::pipe().unwrap()).collect();
    for (i, (_, w)) in pipes.iter().take(4).enumerate() {
        send(&b_to_a, i as u32, &[(w.as_fd(), Rights::WRITE)]);
        expect_deliver(&a_from_b, i as u32);
    }
    send(&b_to_a, 9, &[(pipes[4].1.as_fd(), Rights::WRITE)]);
    expect_refused(&b_to_a, 9, Refusal::OutOfMemory);
}

/// The bench subcommand runs end to end (small counts; no assertion on speed) and ends
/// with its BENCH line; `--help` documents the options init uses.
#[test]
fn bench_and_help_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"))
        .args(["bench", "--messages", "300", "--samples", "50"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    assert!(
        last.starts_with("BENCH hub rate_ratio_vs_direct="),
        "{stdout}"
    );
    for key in ["p50_us=", "p99_us=", "direct_p99_us="] {
        assert!(last.contains(key), "{last}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for opt in [
        "--policy-dir",
        "--control-socket",
        "--vm <NAME=FD>",
        "--audit-log",
    ] {
        assert!(help.contains(opt), "{help}");
    }
}

/// As root the hub refuses to start without `--allow-root`, and says why and what to do.
#[test]
fn the_hub_refuses_root_without_allow_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the hub's refusal to run as root: run it as root (README's test \
         command does)"
    );
    let dir = tempfile::tempdir().unwrap();
    // The hub's end of a VM channel whose VMM end is already closed: a hub that starts
    // exits at once (--exit-when-idle), so nothing here can hang.
    let run = |extra: &[&str]| {
        let (v, h) = Channel::pair().unwrap();
        drop(v);
        let raw = h.as_raw_fd();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"));
        cmd.arg("--policy-dir")
            .arg(dir.path())
            .arg("--vm")
            .arg(format!("a={raw}"))
            .arg("--exit-when-idle")
            .args(extra)
            .env("RUST_LOG", "error");
        // SAFETY: fcntl on an fd open in the child (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        drop(h);
        out
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow-root") && err.contains("root") && err.contains("user"),
        "{err}"
    );
    // With the flag it runs (and exits as its only VM channel is closed).
    let out = run(&["--allow-root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bad `--vm` arguments are refused before anything starts.
#[test]
fn bad_vm_arguments_are_refused() {
    for bad in ["a", "a=x", "a=1", "a=999"] {
        let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"))
            .args(["--policy-dir", "/nonexistent", "--vm", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--vm"),
            "{bad}"
        );
    }
}

/// The VMM-side helper: a send with a memfd and a pipe end, the paired delivery, the
/// verdicts (accepted, and a refusal by sequence number), a send in parts, and
/// back-pressure as WouldBlock.
#[test]
fn vmm_side_client_helper() {
    use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
    let mut h = TestHub::start(POLICY, &["a", "b"], &["--queue", "2"]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let mut b = HubConn::from_fd(b_to_a.into_fd()).unwrap();
    let mut a = HubConn::from_fd(a_from_b.into_fd()).unwrap();
    let m = memfd();
    let (_r, w) = nix::unistd::pipe().unwrap();
    let seq = b
        .try_send(b"hi", &[(m.as_fd(), RO), (w.as_fd(), Rights::WRITE)])
        .unwrap();
    let wait = |c: &mut HubConn| loop {
        match c.try_recv() {
            Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                wait_readable(&[c.as_fd()]);
            }
            other => break other.unwrap(),
        }
    };
    match wait(&mut a) {
        Incoming::Message { data, fds } => {
            assert_eq!(data, b"hi");
            assert_eq!(fds.len(), 2);
            assert_eq!((fds[0].1.fd_type, fds[0].1.rights), (FdType::Memfd, RO));
            assert!(fds[1].1.write_end);
        }
        other => panic!("{other:?}"),
    }
    match wait(&mut b) {
        Incoming::Accepted { seq: s } => assert_eq!(s, seq),
        other => panic!("{other:?}"),
    }
    let bad = b
        .try_send(b"no", &[(m.as_fd(), RO | Rights::WRITE | Rights::RESIZE)])
        .unwrap();
    assert_ne!(bad, seq);
    match wait(&mut b) {
        Incoming::Refused { seq, error } => assert_eq!((seq, error), (bad, Refusal::InvalidArgs)),
        other => panic!("{other:?}"),
    }
    // A send of three parts: one verdict, named by its last part; the receiver gets it all.
    let big: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
    let mut s = b.begin(big.len()).unwrap();
    while !s.done() {
        match b.send_next(&mut s, &big, &[(m.as_fd(), RO)]) {
            Ok(()) => {}
            Err(ClientError::Channel(ChannelError::WouldBlock)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let mut ready = false;
    let verdict = loop {
        if let Some(v) = b.take_verdict(&s, &mut ready).unwrap() {
            break v;
        }
        wait_readable(&[b.as_fd()]);
    };
    assert_eq!(verdict, Ok(()));
    let mut got = Vec::new();
    let mut fds = 0;
    while got.len() < big.len() {
        match wait(&mut a) {
            Incoming::Message { data, fds: f } => {
                fds += f.len();
                got.extend(data);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((got == big, fds), (true, 1));
    let mut sent = 0;
    loop {
        match b.try_send(b"x", &[]) {
            Ok(_) => sent += 1,
            Err(ClientError::Channel(ChannelError::WouldBlock)) => break,
            Err(e) => panic!("{e}"),
        }
        assert!(sent < 1_000_000, "no back-pressure");
    }
}

/// `apply --revoke-live` closes the connections the new generation no longer allows (both
/// VMs hear `Closed`); without it they are listed and stay.
#[test]
fn apply_lists_and_revokes_live_connections() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let (conn, b_to_a, _a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, _a_to_c, _c_from_a) = h.connect("a", "sink", "c").unwrap();
    let new_dir = h.dir.path().join("new.d");
    std::fs::create_dir(&new_dir).unwrap();
    std::fs::write(
        new_dir.join("10-test.policy"),
        POLICY.replace("grant b connect inbox@a\n", ""),
    )
    .unwrap();
    let hash = PolicyTree::load(&RootDir::staging(&new_dir)).hash;
    let apply = |revoke_live: bool| Request::Apply {
        tree_hash: hash.clone(),
        root: new_dir.clone(),
        if_match: None,
        revoke_live,
    };
    let Response::Applied(r) = h.control(&apply(false)) else {
        panic!()
    };
    assert_eq!(r.no_longer_allowed.len(), 1);
    assert_eq!(r.no_longer_allowed[0].vm, "b");
    assert!(!r.revoked);
    // Still open, but frames are refused under the new generation.
    let m = memfd();
    send(&b_to_a, 1, &[(m.as_fd(), RO)]);
    expect_refused(&b_to_a, 1, Refusal::PermissionDenied);
    let Response::Applied(r) = h.control(&apply(true)) else {
        panic!()
    };
    assert!(r.revoked);
    assert_eq!(
        h.vm("b").recv::<HubEvent>().unwrap().0,
        HubEvent::Closed { tag: 0, conn }
    );
    assert_eq!(
        h.vm("a").recv::<HubEvent>().unwrap().0,
        HubEvent::Closed { tag: 0, conn }
    );
    assert!(expect_closed(&b_to_a)
        .iter()
        .all(|e| !matches!(e, ConnEvent::Deliver { .. })));
}

/// A VM whose channel closes loses everything: its services, its connections (peers hear
/// `Closed`), its handle-table entries; a provider that went away looks like any denial.
#[test]
fn vm_going_away_loses_its_services_and_connections() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let (conn, _b_to_a, _a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, a_to_c, c_from_a) = h.connect("a", "sink", "c").unwrap();
    let a_chan = h.vms.remove("a").unwrap();
    drop(a_chan);
    assert_eq!(
        h.vm("b").recv::<HubEvent>().unwrap().0,
        HubEvent::Closed { tag: 0, conn }
    );
    assert!(matches!(
        h.vm("c").recv::<HubEvent>().unwrap().0,
        HubEvent::Closed { .. }
    ));
    assert!(expect_closed(&c_from_a).is_empty());
    drop(a_to_c);
    assert_eq!(
        h.connect("b", "inbox", "a").unwrap_err(),
        Refusal::PermissionDenied
    );
    let audit = h.audit_lines();
    let last = audit.iter().rev().find(|r| r["verb"] == "connect").unwrap();
    assert!(
        last["reason"].as_str().unwrap().contains("not running"),
        "{last}"
    );
}

/// A VMM restarted by init on the same channel says `Hello`: the VM's services and
/// connections go as if the channel had closed, the channel keeps working, and the VM can
/// provide again (P9: a restarted VM starts with nothing).
#[test]
fn hello_on_a_kept_channel_forgets_the_vm() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (conn, _b_to_a, _a_from_b) = h.connect("b", "inbox", "a").unwrap();
    h.vm("a").send(&VmRequest::Hello, &[]).unwrap();
    for vm in ["a", "b"] {
        assert_eq!(
            h.vm(vm).recv::<HubEvent>().unwrap().0,
            HubEvent::Closed { tag: 0, conn }
        );
    }
    assert_eq!(
        h.connect("b", "inbox", "a").unwrap_err(),
        Refusal::PermissionDenied
    );
    assert!(matches!(h.provide("a", "inbox"), HubEvent::Provided { .. }));
    assert!(h.connect("b", "inbox", "a").is_ok());
}

/// A sender that hangs up right after its sends, while the receiver reads nothing: every
/// send it was told was accepted reaches the receiver, in order, and only then EOF (a
/// sender's last frames are not lost when it closes).
#[test]
fn sender_hangs_up_under_back_pressure() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &["--queue", "4"]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let mut accepted = Vec::new();
    for seq in 0..64u32 {
        send(&b_to_a, seq, &[]);
        match b_to_a.next_any().unwrap().0 {
            ConnEvent::Accepted { seq: s } => accepted.push(s),
            ConnEvent::Refused {
                error: Refusal::Busy,
                ..
            } => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(!accepted.is_empty());
    drop(b_to_a);
    // The hub keeps serving other requests meanwhile. (A's channel may first hear of the
    // hang-up: the order of that event and the answer is the hub's to choose.)
    let tag = h.next_tag();
    h.vm("a")
        .send(
            &VmRequest::Provide {
                tag,
                service: name("inbox"),
            },
            &[],
        )
        .unwrap();
    let answer = loop {
        let (ev, _) = h.vm("a").recv::<HubEvent>().unwrap();
        if !matches!(ev, HubEvent::Closed { .. }) {
            break ev;
        }
    };
    assert!(matches!(answer, HubEvent::Provided { .. }), "{answer:?}");
    for seq in &accepted {
        expect_deliver(&a_from_b, *seq);
    }
    assert!(expect_closed(&a_from_b).is_empty());
}

/// Garbage on the VM channel and on a connection socket (random bytes, empty datagrams,
/// bad versions, fds attached to requests): each frame gets exactly one outcome, nothing
/// leaks, and the hub keeps working for everyone.
#[test]
fn garbage_frames_are_refused_and_change_nothing() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    // An allocation sweeps the hub's read-only cache and leaves one probe: same both times.
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    let before = h.hub_fds_quiet();
    let mut runner = TestRunner::deterministic();
    let blobs = proptest::collection::vec(
        proptest::collection::vec(proptest::num::u8::ANY, 0..200),
        100,
    );
    let blobs = blobs.new_tree(&mut runner).unwrap().current();
    let (r, _w) = nix::unistd::pipe().unwrap();
    for (i, blob) in blobs.iter().enumerate() {
        let fds = [r.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage<'_>] = if i % 3 == 0 { &cmsg } else { &[] };
        // VM channel: never a valid version byte, so never a valid request.
        let mut bad = blob.clone();
        if let Some(first) = bad.first_mut() {
            *first = first.wrapping_add(2).max(2);
        }
        let iov = [std::io::IoSlice::new(&bad)];
        sendmsg::<()>(h.vm("b").as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
        // Connection: a valid version byte and random postcard after it.
        let mut framed = blob.clone();
        framed.insert(0, frame::WIRE_VERSION);
        let iov = [std::io::IoSlice::new(&framed)];
        sendmsg::<()>(b_to_a.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    }
    for _ in 0..blobs.len() {
        let (ev, fds) = h.vm("b").recv::<HubEvent>().unwrap();
        assert_eq!(
            ev,
            HubEvent::Refused {
                tag: 0,
                error: Refusal::InvalidArgs
            }
        );
        assert!(fds.is_empty());
    }
    // Each connection frame gets one verdict when its send is complete: refused, or (if the
    // random bytes happened to be a valid fd-less ConnSend) accepted and delivered to A. A
    // frame that decodes as the first part of a longer send gets none until that send ends
    // (and none at all if the next part 0 drops it): count what the protocol promises.
    let mut expected = 0;
    let mut open = false;
    for blob in &blobs {
        let mut framed = blob.clone();
        framed.insert(0, frame::WIRE_VERSION);
        match frame::decode::<ConnSend>(&framed) {
            Err(_) => expected += 1,
            Ok(m) if m.part == 0 => {
                open = m.more;
                expected += usize::from(!m.more);
            }
            Ok(m) if open => {
                open = m.more;
                expected += usize::from(!m.more);
            }
            Ok(_) => expected += 1,
        }
    }
    let mut outcomes = 0;
    let mut delivered = 0;
    while outcomes < expected {
        let mut pfds = [
            libc::pollfd {
                fd: a_from_b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: b_to_a.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; 60 s is a hang guard, not a timing assertion.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 60_000) };
        assert!(n > 0, "hub stalled");
        while let Some((ev, fds)) = a_from_b.try_next() {
            assert!(
                matches!(ev, ConnEvent::Deliver { .. }) && fds.is_empty(),
                "{ev:?}"
            );
            delivered += 1;
        }
        while let Some((ev, fds)) = b_to_a.try_next_any() {
            assert!(
                matches!(ev, ConnEvent::Refused { .. } | ConnEvent::Accepted { .. })
                    && fds.is_empty(),
                "{ev:?}"
            );
            outcomes += 1;
        }
    }
    assert_eq!(outcomes, expected);
    assert!(delivered <= expected);
    let m = memfd();
    send(&b_to_a, 5, &[(m.as_fd(), RO)]);
    expect_deliver(&a_from_b, 5);
    // The hub keeps a probe of a memfd it delivered attenuated while any fd to it is open.
    drop(m);
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    assert_eq!(h.hub_fds_quiet(), before);
}

/// `Release` drops the VM's entry: the object can no longer be sent by it (InvalidId), and
/// a move (no DUP) drops the sender's entry the same way.
#[test]
fn release_and_move_drop_entries() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, a_to_c, c_from_a) = h.connect("a", "sink", "c").unwrap();
    let m = memfd();
    // B gives A read+map+transfer (no DUP): A's forward is a move.
    send(&b_to_a, 1, &[(m.as_fd(), RO | Rights::TRANSFER)]);
    let (_, mut fds) = expect_deliver(&a_from_b, 1);
    let at_a = fds.pop().unwrap();
    send(&a_to_c, 2, &[(at_a.as_fd(), RO)]);
    expect_deliver(&c_from_a, 2);
    send(&a_to_c, 3, &[(at_a.as_fd(), RO)]);
    expect_refused(&a_to_c, 3, Refusal::InvalidId);
    // B gives A a pipe end with DUP; A releases it; A can no longer send it.
    let (_r, w) = nix::unistd::pipe().unwrap();
    send(
        &b_to_a,
        4,
        &[(w.as_fd(), Rights::WRITE | Rights::TRANSFER | Rights::DUP)],
    );
    let (_, mut fds) = expect_deliver(&a_from_b, 4);
    let pw = fds.pop().unwrap();
    let st = nix::sys::stat::fstat(pw.as_fd()).unwrap();
    h.vm("a")
        .send(
            &VmRequest::Release {
                dev: st.st_dev,
                ino: st.st_ino,
            },
            &[],
        )
        .unwrap();
    h.provide("a", "inbox"); // round trip: the release is processed
                             // Without the release this would pass the id check and fail later on the type
                             // (PermissionDenied: sink carries no pipes); released, it fails the id check.
    send(&a_to_c, 6, &[(pw.as_fd(), Rights::WRITE)]);
    expect_refused(&a_to_c, 6, Refusal::InvalidId);
}

fn release(h: &TestHub, vm: &str, fd: BorrowedFd<'_>) {
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

/// TRANSFER cannot be laundered through `Release`: once every holder of an object the hub
/// delivered with attenuated rights has released it (or moved it on), a VM that still has
/// an fd to it and sends it again is not its "origin" with every right, but keeps the
/// attenuated rights (a tombstone, while a description the hub passed is open). When every
/// fd is closed, the hub lets go of the object (its probe fds too).
#[test]
fn released_objects_keep_their_attenuated_rights() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c", "d"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    h.provide("d", "noxfer");
    let (_, b_to_d, d_from_b) = h.connect("b", "noxfer", "d").unwrap();
    let (_, d_to_c, c_from_d) = h.connect("d", "sink", "c").unwrap();
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let (_, a_to_c, c_from_a) = h.connect("a", "sink", "c").unwrap();
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    let before = h.hub_fds_quiet();

    // D gets a memfd without TRANSFER; B (its origin) and D both say they closed it, but D
    // kept its fd. Re-sent, it is not D's to forward.
    let m = memfd();
    send(&b_to_d, 1, &[(m.as_fd(), RO | Rights::TRANSFER)]);
    let (infos, mut fds) = expect_deliver(&d_from_b, 1);
    assert_eq!(infos[0].rights, RO);
    let at_d = fds.pop().unwrap();
    release(&h, "b", m.as_fd());
    release(&h, "d", at_d.as_fd());
    h.provide("a", "inbox"); // round trip: the releases are processed
    send(&d_to_c, 2, &[(at_d.as_fd(), RO)]);
    expect_refused(&d_to_c, 2, Refusal::PermissionDenied);

    // Without lying: A gets RO+TRANSFER (no DUP) and moves it to C, its guest keeping the
    // vfd; B and C release. A's re-send gets only what every delivery got (RO: no TRANSFER).
    let m2 = memfd();
    send(&b_to_a, 3, &[(m2.as_fd(), RO | Rights::TRANSFER)]);
    let (_, mut fds) = expect_deliver(&a_from_b, 3);
    let at_a = fds.pop().unwrap();
    send(&a_to_c, 4, &[(at_a.as_fd(), RO)]);
    let (infos, mut fds) = expect_deliver(&c_from_a, 4);
    assert_eq!(infos[0].rights, RO);
    let at_c = fds.pop().unwrap();
    release(&h, "b", m2.as_fd());
    release(&h, "c", at_c.as_fd());
    h.provide("a", "inbox");
    send(&a_to_c, 5, &[(at_a.as_fd(), RO)]);
    expect_refused(&a_to_c, 5, Refusal::PermissionDenied);
    nothing_pending(&c_from_a);
    nothing_pending(&c_from_d);

    // Every fd closed: a sweep (an allocation) lets the objects and their probes go.
    drop((m, at_d, m2, at_a, at_c));
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    assert_eq!(h.hub_fds_quiet(), before);
}

/// Many frames with fds sent back to back (`sendmmsg` batches, so the hub reads them in
/// `recvmmsg` batches): each frame is still decided alone. The bad ones (a socket among the
/// fds; 29 fds) are refused with one audit record each, every good one in the same batches
/// is delivered in order with its own fds, and the hub's fd count is unchanged.
#[test]
fn batched_frames_are_decided_one_by_one() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    drop(h.alloc("a", 1).unwrap());
    h.provide("a", "inbox");
    let before = h.hub_fds_quiet();
    let m = memfd();
    let (s1, _s2) = Channel::pair().unwrap();
    let (_r, w) = nix::unistd::pipe().unwrap();
    let many: Vec<(OwnedFd, OwnedFd)> = (0..29).map(|_| nix::unistd::pipe().unwrap()).collect();
    let bad = |seq: u32| seq % 7 == 0;
    let truncated = |seq: u32| seq % 13 == 0;
    let frames: Vec<(Vec<u8>, Vec<BorrowedFd<'_>>)> = (1..=50u32)
        .map(|seq| {
            let (fds, rights): (Vec<BorrowedFd<'_>>, Vec<Rights>) = if truncated(seq) {
                many.iter().map(|(_, w)| (w.as_fd(), Rights::WRITE)).unzip()
            } else if bad(seq) {
                vec![(m.as_fd(), RO), (s1.as_fd(), Rights::SEND)]
                    .into_iter()
                    .unzip()
            } else if seq % 2 == 0 {
                vec![(m.as_fd(), RO), (w.as_fd(), Rights::WRITE)]
                    .into_iter()
                    .unzip()
            } else {
                vec![(m.as_fd(), RO)].into_iter().unzip()
            };
            let msg = ConnSend {
                seq,
                data: seq.to_le_bytes().to_vec(),
                rights: rights.into_iter().take(8).collect(),
                part: 0,
                more: false,
            };
            (frame::encode(&msg).unwrap(), fds)
        })
        .collect();
    // Runs of good-sized frames go with sendmmsg; the 29-fd ones need a raw sendmsg.
    let mut sent = 0;
    while sent < frames.len() {
        let (bytes, fds) = &frames[sent];
        if fds.len() > frame::MAX_FDS {
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let iov = [std::io::IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(b_to_a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
            sent += 1;
            continue;
        }
        sent += b_to_a
            .try_send_frames(
                frames[sent..]
                    .iter()
                    .take_while(|(_, f)| f.len() <= frame::MAX_FDS)
                    .map(|(b, f)| (b, f.as_slice())),
            )
            .unwrap();
    }
    for seq in (1..=50u32).filter(|s| !bad(*s) && !truncated(*s)) {
        let (infos, fds) = expect_deliver(&a_from_b, seq);
        assert_eq!(fds.len(), if seq % 2 == 0 { 2 } else { 1 }, "frame {seq}");
        assert_eq!(infos.len(), fds.len());
        assert_eq!(infos[0].rights, RO);
        let ino = |f: BorrowedFd<'_>| nix::sys::stat::fstat(f).unwrap().st_ino;
        assert_eq!(ino(fds[0].as_fd()), ino(m.as_fd()));
        if seq % 2 == 0 {
            assert!(infos[1].write_end);
        }
    }
    nothing_pending(&a_from_b);
    for seq in 1..=50u32 {
        if truncated(seq) {
            expect_refused(&b_to_a, 0, Refusal::InvalidArgs);
        } else if bad(seq) {
            expect_refused(&b_to_a, seq, Refusal::PermissionDenied);
        }
    }
    nothing_pending(&b_to_a);
    // The hub keeps a probe of a memfd it delivered attenuated while any fd to it is open.
    drop(frames);
    drop(m);
    drop(h.alloc("a", 1).unwrap()); // also flushes the audit log
    h.provide("a", "inbox");
    assert_eq!(h.hub_fds_quiet(), before);
    // Every refusal is in exactly one record: a record, or `similar = n` standing for n
    // more identical to the one before it.
    let refused = (1..=50u32).filter(|s| bad(*s) || truncated(*s)).count() as u64;
    let denied: u64 = h
        .audit_lines()
        .into_iter()
        .filter(|r| r["allowed"] == false && r["verb"] == "transfer")
        .map(|r| r["similar"].as_u64().filter(|n| *n > 0).unwrap_or(1))
        .sum();
    assert_eq!(denied, refused);
}

/// The hub admits its own uid on the control socket (status, log), but applies a policy
/// only for root: a process running as the hub's user cannot swap the policy. The hub runs
/// as uid 65534 here, the way init runs it as `[hub] user`.
#[test]
fn apply_is_refused_unless_the_client_is_root() {
    use bulkhead_policy::control::{HubClient, Request, Response};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("needs root to run the hub as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let pdir = dir.path().join("policy.d");
    std::fs::create_dir(&pdir).unwrap();
    std::fs::write(pdir.join("10-test.policy"), "version 1\n").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    let control = run.join("hub.sock");
    /// Kills the hub even when an assertion fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _hub = Killed(
        Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"))
            .arg("--policy-dir")
            .arg(&pdir)
            .arg("--control-socket")
            .arg(&control)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..2000 {
        if control.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let tree_hash = match HubClient::connect(&control)
        .unwrap()
        .request(&Request::Status)
    {
        Ok(Response::Status(s)) => s.tree_hash,
        other => panic!("{other:?}"),
    };
    let apply = Request::Apply {
        tree_hash,
        root: pdir.clone(),
        if_match: None,
        revoke_live: false,
    };
    // As the hub's own user: refused.
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child switches uid, asks once, writes a verdict byte and _exits.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            // SAFETY: integer arguments.
            unsafe { libc::setresuid(65534, 65534, 65534) };
            let verdict = match HubClient::connect(&control).and_then(|c| c.request(&apply)) {
                Ok(Response::Error { message }) if message.contains("only root may apply") => b'R',
                Ok(Response::Applied(_)) => b'A',
                _ => b'?',
            };
            let _ = nix::unistd::write(&w, &[verdict]);
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) }
        }
        nix::unistd::ForkResult::Parent { child: kid } => {
            drop(w);
            let mut b = [0u8; 1];
            let _ = nix::unistd::read(&r, &mut b);
            let _ = nix::sys::wait::waitpid(kid, None);
            assert_eq!(b[0], b'R', "the hub's own uid was not refused");
        }
    }
    // As root: applied.
    let resp = HubClient::connect(&control)
        .unwrap()
        .request(&apply)
        .unwrap();
    assert!(matches!(resp, Response::Applied(_)), "{resp:?}");
}

/// `Request::Vms` (what `bulkhead-ctl ls` shows): each VM with the connections it takes
/// part in, as client or provider.
#[test]
fn control_socket_counts_each_vms_connections() {
    let mut h = TestHub::start(POLICY, &["a", "b", "c"], &[]);
    h.provide("a", "inbox");
    h.provide("c", "sink");
    let _ab = h.connect("b", "inbox", "a").unwrap();
    let _ac = h.connect("a", "sink", "c").unwrap();
    let Response::Vms(vms) = h.control(&Request::Vms) else {
        panic!("no Vms answer")
    };
    let count = |n: &str| vms.iter().find(|v| v.vm == n).map(|v| v.connections);
    assert_eq!(count("a"), Some(2));
    assert_eq!(count("b"), Some(1));
    assert_eq!(count("c"), Some(1));
    assert!(vms.iter().all(|v| v.channel_open));
}
