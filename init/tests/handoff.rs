//! Handing descriptors to a child at fds 3, 4, … must not overwrite the pipe through which
//! std's `Command::spawn` learns that exec failed. This file holds one test so that it
//! owns its process's descriptor numbers: it leaves holes on the target numbers, where the
//! pipe std opens during the spawn would otherwise land.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use bulkhead_init::handoff::{self, Handoff, FIRST_FD};
use nix::sys::socket::{recv, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};

const HANDED: usize = 8;

#[test]
fn a_failed_exec_is_reported_and_nothing_is_written_into_the_handed_over_fds() {
    // Fill every low descriptor number with a filler...
    let mut fillers: Vec<File> = Vec::new();
    loop {
        let f = File::open("/dev/null").unwrap();
        if f.as_raw_fd() >= FIRST_FD + HANDED as i32 + 16 {
            break;
        }
        fillers.push(f);
    }
    // ...make the descriptors to hand over (they land above the target range)...
    let mut peers: Vec<OwnedFd> = Vec::new();
    let mut handoff = Handoff::default();
    for _ in 0..HANDED {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .unwrap();
        handoff.fds.push(theirs);
        peers.push(ours);
    }
    // ...then free the target numbers: whatever is opened next takes them.
    let holes: Vec<i32> = (FIRST_FD..FIRST_FD + HANDED as i32).collect();
    fillers.retain(|f| !holes.contains(&f.as_raw_fd()));
    assert!(
        handoff
            .fds
            .iter()
            .all(|f| f.as_raw_fd() >= FIRST_FD + HANDED as i32),
        "the test needs the handed-over descriptors above the target range"
    );

    let mut cmd = Command::new("/nonexistent/bulkhead-no-such-program");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let spawned = handoff::spawn(&mut cmd, &handoff);
    match &spawned {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        Ok(child) => panic!(
            "exec of a missing program reported as a start (pid {}): the exec-error pipe was \
             overwritten by a handed-over descriptor",
            child.id()
        ),
    }
    for (i, peer) in peers.iter().enumerate() {
        let mut buf = [0u8; 64];
        match recv(peer.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Err(nix::errno::Errno::EAGAIN) => {}
            other => panic!(
                "handed-over descriptor {} received {other:?}: the child's exec error went into it",
                FIRST_FD + i as i32
            ),
        }
    }
    drop(fillers);
}
