//! Every send gets a verdict its sender sees (`Accepted` or `Refused`, named by the seq of
//! its last part), and a send is delivered whole or not at all, however many parts it
//! took. Against a real hub process (see `common`).

mod common;

use std::os::fd::{AsFd, BorrowedFd};

use bulkhead_ipc::hub::protocol::{ConnEvent, ConnSend, Refusal, MAX_SEND, PART_DATA};
use bulkhead_policy::control::{Request, Response};
use bulkhead_policy::{PolicyTree, Rights, RootDir};
use common::*;

fn part(seq: u32, data: Vec<u8>, rights: &[Rights], part: u16, more: bool) -> ConnSend {
    ConnSend {
        seq,
        data,
        rights: rights.iter().copied().collect(),
        part,
        more,
    }
}

fn send_part(p: &Peer, m: &ConnSend, fds: &[BorrowedFd<'_>]) {
    p.send(m, fds).unwrap();
}

/// The next verdict on `p` (deliveries to `p` are not expected here).
fn verdict(p: &Peer) -> ConnEvent {
    loop {
        match p.next_any().unwrap().0 {
            ConnEvent::Ready => {}
            ev @ (ConnEvent::Accepted { .. } | ConnEvent::Refused { .. }) => return ev,
            other => panic!("{other:?}"),
        }
    }
}

/// Each send is answered, in order: accepted ones and refused ones alike, so a VMM can
/// answer its guest's `VFD_SEND` with what the hub decided; a refused send reaches no one.
#[test]
fn every_send_gets_its_verdict() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let m = memfd();
    let (_r, w) = nix::unistd::pipe().unwrap();
    send(&b_to_a, 1, &[(m.as_fd(), RO)]);
    send(&b_to_a, 2, &[(m.as_fd(), RO | Rights::RESIZE)]); // more than B may ask
    send(&b_to_a, 3, &[(w.as_fd(), Rights::WRITE)]);
    send(&b_to_a, 4, &[(w.as_fd(), Rights::READ)]); // a write end cannot read
    send(&b_to_a, 5, &[]);
    assert_eq!(verdict(&b_to_a), ConnEvent::Accepted { seq: 1 });
    assert_eq!(
        verdict(&b_to_a),
        ConnEvent::Refused {
            seq: 2,
            error: Refusal::InvalidArgs
        }
    );
    assert_eq!(verdict(&b_to_a), ConnEvent::Accepted { seq: 3 });
    assert!(matches!(
        verdict(&b_to_a),
        ConnEvent::Refused { seq: 4, .. }
    ));
    assert_eq!(verdict(&b_to_a), ConnEvent::Accepted { seq: 5 });
    for seq in [1, 3, 5] {
        expect_deliver(&a_from_b, seq);
    }
    nothing_pending(&a_from_b);
}

/// A send in parts is decided as a whole when its last part arrives, and delivered all
/// together or not at all: a good one arrives whole (its fd with the first part, its
/// verdict naming the last); one whose later part carries fds, one that goes past the
/// largest send, and one whose connection is revoked between its parts are refused whole
/// and reach no one; one its VMM gave up on (a new part 0 came) is dropped without a
/// verdict; a part of a send that was never started is refused alone.
#[test]
fn a_split_send_is_delivered_whole_or_not_at_all() {
    let mut h = TestHub::start(POLICY, &["a", "b"], &[]);
    h.provide("a", "inbox");
    let (_, b_to_a, a_from_b) = h.connect("b", "inbox", "a").unwrap();
    let m = memfd();
    let chunk = |i: u8| vec![i; PART_DATA];

    // Whole: three parts, a memfd with the first.
    send_part(&b_to_a, &part(10, chunk(1), &[RO], 0, true), &[m.as_fd()]);
    send_part(&b_to_a, &part(11, chunk(2), &[], 1, true), &[]);
    send_part(&b_to_a, &part(12, vec![3; 10], &[], 2, false), &[]);
    assert_eq!(verdict(&b_to_a), ConnEvent::Accepted { seq: 12 });
    let mut data = Vec::new();
    let mut fds = 0;
    while data.len() < 2 * PART_DATA + 10 {
        match a_from_b.next().unwrap() {
            (ConnEvent::Deliver { data: d, .. }, f) => {
                fds += f.len();
                data.extend(d);
            }
            other => panic!("{other:?}"),
        }
    }
    let mut want = chunk(1);
    want.extend(chunk(2));
    want.extend(vec![3; 10]);
    assert_eq!((data == want, fds), (true, 1));
    nothing_pending(&a_from_b);

    // fds with a later part: refused whole.
    send_part(&b_to_a, &part(20, chunk(1), &[], 0, true), &[]);
    send_part(&b_to_a, &part(21, chunk(2), &[RO], 1, false), &[m.as_fd()]);
    assert_eq!(
        verdict(&b_to_a),
        ConnEvent::Refused {
            seq: 21,
            error: Refusal::InvalidArgs
        }
    );

    // Abandoned after two parts, then a send of its own: only that one, one verdict.
    send_part(&b_to_a, &part(30, chunk(1), &[], 0, true), &[]);
    send_part(&b_to_a, &part(31, chunk(2), &[], 1, true), &[]);
    send(&b_to_a, 32, &[]);
    assert_eq!(verdict(&b_to_a), ConnEvent::Accepted { seq: 32 });
    expect_deliver(&a_from_b, 32);

    // A part of nothing.
    send_part(&b_to_a, &part(40, chunk(1), &[], 3, false), &[]);
    assert_eq!(
        verdict(&b_to_a),
        ConnEvent::Refused {
            seq: 40,
            error: Refusal::InvalidArgs
        }
    );

    // Past the largest send.
    let parts = u16::try_from(MAX_SEND / PART_DATA + 1).unwrap();
    for i in 0..=parts {
        let more = i < parts;
        send_part(
            &b_to_a,
            &part(50 + u32::from(i), chunk(9), &[], i, more),
            &[],
        );
    }
    assert_eq!(
        verdict(&b_to_a),
        ConnEvent::Refused {
            seq: 50 + u32::from(parts),
            error: Refusal::InvalidArgs
        }
    );
    nothing_pending(&a_from_b);

    // Revoked between its parts: the generation at the last part decides, for all of it.
    send_part(&b_to_a, &part(90, chunk(1), &[RO], 0, true), &[m.as_fd()]);
    send_part(&b_to_a, &part(91, chunk(2), &[], 1, true), &[]);
    let new_dir = h.dir.path().join("new.d");
    std::fs::create_dir(&new_dir).unwrap();
    std::fs::write(
        new_dir.join("10-test.policy"),
        POLICY.replace("grant b connect inbox@a\n", ""),
    )
    .unwrap();
    let hash = PolicyTree::load(&RootDir::staging(&new_dir)).hash;
    let r = h.control(&Request::Apply {
        tree_hash: hash,
        root: new_dir,
        if_match: None,
        revoke_live: false,
    });
    assert!(matches!(r, Response::Applied(_)), "{r:?}");
    send_part(&b_to_a, &part(92, vec![3; 10], &[], 2, false), &[]);
    assert_eq!(
        verdict(&b_to_a),
        ConnEvent::Refused {
            seq: 92,
            error: Refusal::PermissionDenied
        }
    );
    nothing_pending(&a_from_b);
}
