//! Per-VM budgets: one VM that floods the hub (or stops reading) spends its own budgets,
//! and every other VM goes on as before. Against a real hub process (see `common`); every
//! assertion is on counts and outcomes, none on time.

mod common;

use std::os::fd::{AsFd, OwnedFd};

use bulkhead_ipc::channel::ChannelError;
use bulkhead_ipc::hub::protocol::{ConnEvent, ConnId, HubEvent, Refusal, VmRequest};
use bulkhead_policy::Rights;
use common::*;

/// An unprivileged uid for the hub when the tests run as root (fds in flight then count
/// against its `RLIMIT_NOFILE`: `ETOOMANYREFS`).
const HUB_UID: u32 = 42_420;

const FLOOD: &str = "version 1
grant r provide sink c2s=pipe:w+transfer+dup max-fds=28
grant a connect sink@r
grant d provide work c2s=memfd:ro max-fds=8
grant c connect work@d
grant @any quota shm=64KiB shm-count=4 vfds=4096
";

/// R provides `sink` and never reads; A opens 8 connections to it and sends frames of 28
/// fds on each until it can send no more. The hub (with 4096 fds) does not run out of fds,
/// does not reach `ETOOMANYREFS`, and closes nothing: C and D, meanwhile, exchange 2000
/// frames with a memfd each, every one delivered in order. A's frames past R's budget are
/// refused `Busy`, its connections stay open, and what R was sent arrives when R reads.
#[test]
fn a_vm_that_stops_reading_does_not_slow_the_others() {
    let spawn = Spawn {
        nofile: Some(4096),
        uid: Some(HUB_UID),
    };
    let mut h = TestHub::start_with(FLOOD, &["a", "r", "c", "d"], &[], spawn);
    h.provide("r", "sink");
    h.provide("d", "work");
    let (_, c_to_d, d_from_c) = h.connect("c", "work", "d").unwrap();
    let mut conns = Vec::new();
    for _ in 0..8 {
        conns.push(h.connect("a", "sink", "r").unwrap());
    }
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..28).map(|_| nix::unistd::pipe().unwrap()).collect();
    let fds: Vec<_> = pipes
        .iter()
        .map(|(_, w)| (w.as_fd(), Rights::WRITE))
        .collect();
    let mut sent = 0u32;
    for (_, a_to_r, _) in &conns {
        // Until A's socket is full: the hub reads on while it has room for A's verdicts,
        // which A does not read.
        for i in 0..5000u32 {
            let rights: Vec<Rights> = fds.iter().map(|(_, r)| *r).collect();
            let raw: Vec<_> = fds.iter().map(|(f, _)| *f).collect();
            match a_to_r.try_send(&msg(i, &rights), &raw) {
                Ok(()) => sent += 1,
                Err(ChannelError::WouldBlock) => break,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(sent > 64, "A sent only {sent} frames");
    // C and D work at their own pace, whatever A and R do.
    let m = memfd();
    for seq in 0..2000u32 {
        send(&c_to_d, seq, &[(m.as_fd(), RO)]);
        let (infos, got) = expect_deliver(&d_from_c, seq);
        assert_eq!((infos.len(), got.len()), (1, 1));
        c_to_d.expect_accepted(seq);
    }
    // A's connections are all open, each told Busy past R's budget (or accepted).
    let mut busy = 0;
    for (_, a_to_r, r_from_a) in &conns {
        let mut accepted = Vec::new();
        while let Some((ev, _)) = a_to_r.try_next_any() {
            match ev {
                ConnEvent::Accepted { seq } => accepted.push(seq),
                ConnEvent::Refused {
                    error: Refusal::Busy,
                    ..
                } => busy += 1,
                ConnEvent::Ready => {}
                other => panic!("A got {other:?}"),
            }
        }
        // R reads now: what A was told went through arrives, whole (28 fds each).
        for seq in accepted {
            let (infos, got) = expect_deliver(r_from_a, seq);
            assert_eq!((infos.len(), got.len()), (28, 28));
        }
    }
    assert!(busy > 0, "R's budget never refused anything");
    assert!(matches!(h.provide("r", "sink"), HubEvent::Provided { .. }));
}

const TOMBS: &str = "version 1
grant b provide t c2s=pipe:r max-fds=8
grant a connect t@b
grant d provide u c2s=pipe:r max-fds=8
grant c connect u@d
grant @any quota shm=64KiB shm-count=4 vfds=64
";

/// Waits for the verdict on `seq`: whether it was accepted.
fn verdict(p: &Peer, seq: u32) -> Result<(), Refusal> {
    loop {
        match p.next_any().unwrap().0 {
            ConnEvent::Accepted { seq: s } if s == seq => return Ok(()),
            ConnEvent::Refused { seq: s, error } if s == seq => return Err(error),
            ConnEvent::Ready | ConnEvent::Accepted { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}

/// A and B make tombstones as fast as they can (attenuated pipe ends, released by both);
/// past A's tombstone budget A's releases are not honoured, so A soon fills its own `vfds`
/// quota and its sends are refused. C and D, afterwards, make 200 tombstones of their own
/// without a single refusal.
#[test]
fn a_tombstone_flood_stays_with_its_vm() {
    let mut h = TestHub::start(TOMBS, &["a", "b", "c", "d"], &["--vm-tombstones", "256"]);
    h.provide("b", "t");
    h.provide("d", "u");
    let (_, a_to_b, b_from_a) = h.connect("a", "t", "b").unwrap();
    let (_, c_to_d, d_from_c) = h.connect("c", "u", "d").unwrap();
    let mut refused = 0;
    for seq in 0..17_000u32 {
        let (r, _w) = nix::unistd::pipe().unwrap();
        send(&a_to_b, seq, &[(r.as_fd(), Rights::READ)]);
        match verdict(&a_to_b, seq) {
            Ok(()) => {
                let (_, mut fds) = expect_deliver(&b_from_a, seq);
                release(&h, "b", fds.pop().unwrap().as_fd());
                release(&h, "a", r.as_fd());
            }
            Err(Refusal::OutOfMemory) => {
                refused += 1;
                if refused > 100 {
                    break;
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(refused > 0, "the flooder was never stopped");
    // Round trips: every release above has been processed.
    h.provide("a", "x");
    h.provide("b", "x");
    for seq in 0..200u32 {
        let (r, _w) = nix::unistd::pipe().unwrap();
        send(&c_to_d, seq, &[(r.as_fd(), Rights::READ)]);
        assert_eq!(verdict(&c_to_d, seq), Ok(()), "C's send {seq}");
        let (_, mut fds) = expect_deliver(&d_from_c, seq);
        release(&h, "d", fds.pop().unwrap().as_fd());
        release(&h, "c", r.as_fd());
        h.provide("c", "x"); // the releases are processed before the next send
    }
}

const EVENTS: &str = "version 1
grant p provide svc c2s=memfd:ro max-fds=1
grant c connect svc@p
grant @any quota shm=64KiB shm-count=4 vfds=64
";

/// P provides a service and stops reading its VM channel; C connects and closes 600 times.
/// No event is dropped: every connection C was given was announced to P (`Accept`) and its
/// close too (`Closed`); once P's queue is full C's connects are refused `Busy` instead of
/// making connections P never hears of. When P reads again, C can connect.
#[test]
fn an_event_flood_drops_nothing() {
    let mut h = TestHub::start(EVENTS, &["p", "c"], &[]);
    h.provide("p", "svc");
    let mut made: Vec<ConnId> = Vec::new();
    let mut busy = 0;
    for _ in 0..600 {
        let tag = h.next_tag();
        let (ev, _fds) = h.request(
            "c",
            VmRequest::Connect {
                tag,
                service: name("svc"),
                provider: Some(name("p")),
            },
        );
        match ev {
            HubEvent::Connected { conn, .. } => {
                made.push(conn);
                let tag = h.next_tag();
                let (ev, _) = h.request("c", VmRequest::Close { tag, conn });
                assert_eq!(ev, HubEvent::Closed { tag, conn });
            }
            HubEvent::Refused {
                error: Refusal::Busy,
                ..
            } => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(busy > 0, "P's event queue never filled");
    // P reads everything now: an Accept and a Closed for every connection made.
    let mut accepted = Vec::new();
    let mut closed = Vec::new();
    while accepted.len() < made.len() || closed.len() < made.len() {
        match h.vm("p").recv::<HubEvent>().unwrap().0 {
            HubEvent::Accept { conn, .. } => accepted.push(conn),
            HubEvent::Closed { conn, .. } => closed.push(conn),
            other => panic!("{other:?}"),
        }
    }
    accepted.sort();
    closed.sort();
    assert_eq!(accepted, made);
    assert_eq!(closed, made);
    assert!(h.connect("c", "svc", "p").is_ok());
}
