//! Wire-layer tests on real AF_UNIX SOCK_SEQPACKET sockets.
//!
//! Every case counts the entries of /proc/self/fd before and after, so a leaked fd fails
//! the test. Cases hold one lock because the fd table is shared by the test threads, and
//! nothing in this file opens an fd outside it (not even for a moment).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use bulkhead_ipc::channel::{Channel, ChannelError, ChannelListener};
use bulkhead_ipc::frame::{self, FrameError, MAX_FDS, MAX_FRAME, WIRE_VERSION};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::stat::fstat;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

static FD_TABLE: Mutex<()> = Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Runs `case` under the lock and fails if the number of open fds changed.
fn no_leak(case: impl FnOnce()) {
    let _guard = FD_TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let before = open_fds();
    case();
    let after = open_fds();
    assert_eq!(
        before, after,
        "fd leak: {before} open before, {after} after"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { name: String, n: u64 },
    Blob(Vec<u8>),
    Nothing,
}

fn pipes(n: usize) -> Vec<(File, File)> {
    (0..n)
        .map(|_| {
            let (r, w) = nix::unistd::pipe().unwrap();
            (File::from(r), File::from(w))
        })
        .collect()
}

fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let (sa, sb) = (fstat(a).unwrap(), fstat(b).unwrap());
    sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}

fn raw_send(ch: &Channel, bytes: &[u8], fds: &[RawFd]) {
    let iov = [std::io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(ch.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
    assert_eq!(n, bytes.len());
}

fn assert_nothing_pending(ch: &Channel) {
    assert!(matches!(
        ch.try_recv::<Msg>(),
        Err(ChannelError::WouldBlock)
    ));
}

#[test]
fn round_trip_with_every_fd_count_from_0_to_28() {
    for count in 0..=MAX_FDS {
        no_leak(|| {
            let (a, b) = Channel::pair().unwrap();
            let ends = pipes(count);
            let readers: Vec<BorrowedFd<'_>> = ends.iter().map(|(r, _)| r.as_fd()).collect();
            let msg = Msg::Hello {
                name: format!("case {count}"),
                n: count as u64,
            };
            a.send(&msg, &readers).unwrap();
            let (got, fds) = b.recv::<Msg>().unwrap();
            assert_eq!(got, msg);
            assert_eq!(fds.len(), count);
            for (fd, (r, w)) in fds.iter().zip(ends.iter()) {
                assert!(same_file(fd.as_fd(), r.as_fd()));
                // A different fd number: the kernel installed a new one for us.
                assert_ne!(fd.as_raw_fd(), r.as_raw_fd());
                let flags = FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD).unwrap());
                assert!(
                    flags.contains(FdFlag::FD_CLOEXEC),
                    "MSG_CMSG_CLOEXEC missing"
                );
                // And it really is the pipe: bytes written at one end come out of it.
                (&*w).write_all(b"x").unwrap();
                let mut buf = [0u8; 1];
                File::from(fd.try_clone().unwrap())
                    .read_exact(&mut buf)
                    .unwrap();
                assert_eq!(&buf, b"x");
            }
        });
    }
}

#[test]
fn twenty_nine_fds_refused_by_sender_and_nothing_sent() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(MAX_FDS + 1);
        let readers: Vec<BorrowedFd<'_>> = ends.iter().map(|(r, _)| r.as_fd()).collect();
        let err = a.send(&Msg::Nothing, &readers).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::Frame(FrameError::TooManyFds { count: 29, .. })
        ));
        assert_nothing_pending(&b);
    });
}

#[test]
fn twenty_nine_fds_from_raw_sender_truncated_and_all_closed() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(MAX_FDS + 1);
        let raw: Vec<RawFd> = ends.iter().map(|(r, _)| r.as_raw_fd()).collect();
        let frame = frame::encode(&Msg::Nothing).unwrap();
        raw_send(&a, &frame, &raw);
        match b.recv::<Msg>() {
            Err(ChannelError::Truncated {
                data: false,
                control: true,
                fds_closed,
            }) => assert_eq!(fds_closed, MAX_FDS),
            other => panic!("expected control truncation, got {other:?}"),
        }
        // The channel still works afterwards.
        a.send(&Msg::Nothing, &[]).unwrap();
        assert_eq!(b.recv::<Msg>().unwrap().0, Msg::Nothing);
    });
}

#[test]
fn oversize_message_refused_by_sender() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let err = a.send(&Msg::Blob(vec![1; MAX_FRAME]), &[]).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::Frame(FrameError::TooLarge { .. })
        ));
        assert_nothing_pending(&b);
        // The largest message that fits goes through.
        let fits = Msg::Blob(vec![1; MAX_FRAME - 16]);
        a.send(&fits, &[]).unwrap();
        assert_eq!(b.recv::<Msg>().unwrap().0, fits);
    });
}

#[test]
fn oversize_raw_datagram_with_fds_truncated_consumed_and_fds_closed() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(3);
        let raw: Vec<RawFd> = ends.iter().map(|(r, _)| r.as_raw_fd()).collect();
        let mut big = vec![0u8; MAX_FRAME + 100];
        big[0] = WIRE_VERSION;
        raw_send(&a, &big, &raw);
        match b.recv::<Msg>() {
            Err(ChannelError::Truncated {
                data: true,
                fds_closed: 3,
                ..
            }) => {}
            other => panic!("expected data truncation, got {other:?}"),
        }
        // Not left pending: the next frame is the next message.
        assert_nothing_pending(&b);
        a.send(&Msg::Nothing, &[]).unwrap();
        assert_eq!(b.recv::<Msg>().unwrap().0, Msg::Nothing);
    });
}

#[test]
fn zero_length_datagram_consumed_and_reported() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        raw_send(&a, &[], &[]);
        a.send(&Msg::Nothing, &[]).unwrap();
        assert!(matches!(
            b.recv::<Msg>(),
            Err(ChannelError::EmptyFrame { fds_closed: 0 })
        ));
        // The empty datagram is gone; the real message is next.
        assert_eq!(b.recv::<Msg>().unwrap().0, Msg::Nothing);
        assert_nothing_pending(&b);
    });
}

#[test]
fn zero_length_datagram_with_fds_closes_them() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(2);
        let raw: Vec<RawFd> = ends.iter().map(|(r, _)| r.as_raw_fd()).collect();
        raw_send(&a, &[], &raw);
        assert!(matches!(
            b.try_recv::<Msg>(),
            Err(ChannelError::EmptyFrame { fds_closed: 2 })
        ));
        assert_nothing_pending(&b);
    });
}

#[test]
fn garbage_frame_is_an_error_and_its_fds_are_closed() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(4);
        let raw: Vec<RawFd> = ends.iter().map(|(r, _)| r.as_raw_fd()).collect();
        raw_send(&a, &[WIRE_VERSION, 0xff, 0xff], &raw);
        assert!(matches!(
            b.recv::<Msg>(),
            Err(ChannelError::Frame(FrameError::Decode(_)))
        ));
        raw_send(&a, &[42, 0], &[]);
        assert!(matches!(
            b.recv::<Msg>(),
            Err(ChannelError::Frame(FrameError::BadVersion(42)))
        ));
        assert_nothing_pending(&b);
    });
}

#[test]
fn closed_peer_reported_as_closed() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        a.send(&Msg::Nothing, &[]).unwrap();
        drop(a);
        // Queued data is still delivered, then EOF.
        assert_eq!(b.recv::<Msg>().unwrap().0, Msg::Nothing);
        let r = b.recv::<Msg>();
        assert!(matches!(r, Err(ChannelError::Closed)), "{r:?}");
        assert!(matches!(b.try_recv::<Msg>(), Err(ChannelError::Closed)));
        assert!(matches!(
            b.send(&Msg::Nothing, &[]),
            Err(ChannelError::Closed)
        ));
    });
}

#[test]
fn try_send_reports_back_pressure_instead_of_blocking() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let blob = Msg::Blob(vec![0; 4096]);
        let mut sent = 0usize;
        loop {
            match a.try_send(&blob, &[]) {
                Ok(()) => sent += 1,
                Err(ChannelError::WouldBlock) => break,
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(sent < 100_000, "socket buffer never filled");
        }
        assert!(sent > 0);
        // Reading one frees room again.
        b.recv::<Msg>().unwrap();
        a.try_send(&Msg::Nothing, &[]).unwrap();
    });
}

#[test]
fn peer_credentials_name_this_process() {
    no_leak(|| {
        let (a, _b) = Channel::pair().unwrap();
        let cred = a.peer_credentials().unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(cred.gid, nix::unistd::getegid().as_raw());
    });
}

#[test]
fn listener_accepts_connections_with_mode_and_credentials() {
    // The directory is made and removed under the lock too: removing it opens directory fds
    // for a moment, which another case's count would see.
    no_leak(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = ChannelListener::bind(&path, 0o600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(listener.accept(), Err(ChannelError::WouldBlock)));
        let client = Channel::connect(&path).unwrap();
        let server = listener.accept().unwrap();
        assert_eq!(
            server.peer_credentials().unwrap().pid,
            std::process::id() as i32
        );
        client.send(&Msg::Nothing, &[]).unwrap();
        assert_eq!(server.try_recv::<Msg>().unwrap().0, Msg::Nothing);
        drop(listener);
        // Re-binding over the stale socket file works.
        let again = ChannelListener::bind(&path, 0o600).unwrap();
        drop(again);
    });
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (".{0,64}", any::<u64>()).prop_map(|(name, n)| Msg::Hello { name, n }),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Msg::Blob),
        Just(Msg::Nothing),
    ]
}

proptest! {
    // No failure-persistence file: the runner would read it outside the fd-table lock, and
    // another case counting /proc/self/fd would see its fd.
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]
    #[test]
    fn proptest_round_trip(msg in arb_msg(), nfds in 0..=MAX_FDS) {
        no_leak(|| {
            let (a, b) = Channel::pair().unwrap();
            let files: Vec<OwnedFd> = (0..nfds)
                .map(|_| OwnedFd::from(tempfile::tempfile().unwrap()))
                .collect();
            let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
            a.send(&msg, &borrowed).unwrap();
            let (got, fds) = b.recv::<Msg>().unwrap();
            assert_eq!(&got, &msg);
            assert_eq!(fds.len(), nfds);
            for (x, y) in fds.iter().zip(files.iter()) {
                assert!(same_file(x.as_fd(), y.as_fd()));
            }
        });
    }
}

// ---- batches: recvmmsg / sendmmsg / close_fds -------------------------------------------

use bulkhead_ipc::channel::{close_fds, RawFrame, RecvBatch, RECV_BATCH, SEND_BATCH};

fn recv_batch(
    ch: &Channel,
    batch: &mut RecvBatch,
    max: usize,
) -> Vec<Result<RawFrame, ChannelError>> {
    let mut out = Vec::new();
    ch.try_recv_frames(batch, max, &mut out).unwrap();
    out
}

#[test]
fn batch_receive_keeps_each_frames_fds_with_it() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(10);
        // Frames with 0, 1, 2, 3 and 4 fds: fds k*(k-1)/2 .. of `ends`.
        let mut next = 0;
        for k in 0..5usize {
            let fds: Vec<BorrowedFd<'_>> = ends[next..next + k]
                .iter()
                .map(|(r, _)| r.as_fd())
                .collect();
            a.send(
                &Msg::Hello {
                    name: "x".into(),
                    n: k as u64,
                },
                &fds,
            )
            .unwrap();
            next += k;
        }
        let mut batch = RecvBatch::new();
        let got = recv_batch(&b, &mut batch, RECV_BATCH);
        assert_eq!(got.len(), 5);
        let mut next = 0;
        for (k, r) in got.into_iter().enumerate() {
            let raw = r.unwrap();
            let msg: Msg = frame::decode(&raw.bytes).unwrap();
            assert_eq!(
                msg,
                Msg::Hello {
                    name: "x".into(),
                    n: k as u64
                }
            );
            assert_eq!(raw.fds.len(), k);
            for (fd, (r, _)) in raw.fds.iter().zip(&ends[next..next + k]) {
                assert!(same_file(fd.as_fd(), r.as_fd()));
                let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
                assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
            }
            next += k;
        }
        assert!(matches!(
            b.try_recv_frames(&mut batch, RECV_BATCH, &mut Vec::new()),
            Err(ChannelError::WouldBlock)
        ));
    });
}

#[test]
fn batch_receive_bad_frames_close_only_their_own_fds() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(MAX_FDS + 1);
        let all: Vec<RawFd> = ends.iter().map(|(r, _)| r.as_raw_fd()).collect();
        let good = frame::encode(&Msg::Nothing).unwrap();
        raw_send(&a, &good, &all[..1]);
        raw_send(&a, &good, &all); // 29 fds: MSG_CTRUNC
        raw_send(&a, &[], &all[..2]); // empty datagram with fds
        let mut big = vec![0u8; MAX_FRAME + 1];
        big[0] = WIRE_VERSION;
        raw_send(&a, &big, &all[..3]); // MSG_TRUNC
        raw_send(&a, &good, &all[1..3]);
        let mut batch = RecvBatch::new();
        let got = recv_batch(&b, &mut batch, RECV_BATCH);
        assert_eq!(got.len(), 5);
        let mut it = got.into_iter();
        let first = it.next().unwrap().unwrap();
        assert_eq!(first.fds.len(), 1);
        assert!(same_file(first.fds[0].as_fd(), ends[0].0.as_fd()));
        assert!(matches!(
            it.next().unwrap(),
            Err(ChannelError::Truncated {
                control: true,
                fds_closed: MAX_FDS,
                ..
            })
        ));
        assert!(matches!(
            it.next().unwrap(),
            Err(ChannelError::EmptyFrame { fds_closed: 2 })
        ));
        assert!(matches!(
            it.next().unwrap(),
            Err(ChannelError::Truncated {
                data: true,
                fds_closed: 3,
                ..
            })
        ));
        let last = it.next().unwrap().unwrap();
        assert_eq!(last.fds.len(), 2);
        assert!(same_file(last.fds[0].as_fd(), ends[1].0.as_fd()));
        assert!(same_file(last.fds[1].as_fd(), ends[2].0.as_fd()));
    });
}

#[test]
fn batch_receive_reuses_buffers_without_stale_fds_and_respects_max() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(1);
        let mut batch = RecvBatch::new();
        for _ in 0..RECV_BATCH {
            a.send(&Msg::Nothing, &[ends[0].0.as_fd()]).unwrap();
        }
        assert!(recv_batch(&b, &mut batch, RECV_BATCH)
            .into_iter()
            .all(|r| r.unwrap().fds.len() == 1));
        // The control buffers still hold the old fd numbers: fd-less frames must get none.
        for i in 0..5u64 {
            a.send(
                &Msg::Hello {
                    name: String::new(),
                    n: i,
                },
                &[],
            )
            .unwrap();
        }
        let got = recv_batch(&b, &mut batch, 3);
        assert_eq!(got.len(), 3, "at most `max` datagrams");
        assert!(got.into_iter().all(|r| r.unwrap().fds.is_empty()));
        let got = recv_batch(&b, &mut batch, RECV_BATCH);
        assert_eq!(got.len(), 2);
        assert!(got.into_iter().all(|r| r.unwrap().fds.is_empty()));
    });
}

#[test]
fn batch_receive_reports_eof_once_after_the_queued_frames() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        a.send(&Msg::Nothing, &[]).unwrap();
        a.send(&Msg::Nothing, &[]).unwrap();
        drop(a);
        let mut batch = RecvBatch::new();
        let got = recv_batch(&b, &mut batch, RECV_BATCH);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].is_ok() && got[1].is_ok());
        assert!(matches!(got[2], Err(ChannelError::Closed)));
    });
}

#[test]
fn batch_send_delivers_each_frame_with_its_own_fds() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(SEND_BATCH + 4);
        let frames: Vec<(Vec<u8>, Vec<BorrowedFd<'_>>)> = (0..SEND_BATCH + 4)
            .map(|i| {
                let bytes = frame::encode(&Msg::Hello {
                    name: String::new(),
                    n: i as u64,
                })
                .unwrap();
                let fds = (0..=i % 3)
                    .map(|j| ends[(i + j) % ends.len()].0.as_fd())
                    .collect();
                (bytes, fds)
            })
            .collect();
        let sent = a
            .try_send_frames(frames.iter().map(|(b, f)| (b, f.as_slice())))
            .unwrap();
        assert_eq!(sent, SEND_BATCH, "one call sends at most SEND_BATCH");
        let rest = a
            .try_send_frames(frames[sent..].iter().map(|(b, f)| (b, f.as_slice())))
            .unwrap();
        assert_eq!(rest, 4);
        for (i, (_, fds)) in frames.iter().enumerate() {
            let (msg, got) = b.try_recv::<Msg>().unwrap();
            assert_eq!(
                msg,
                Msg::Hello {
                    name: String::new(),
                    n: i as u64
                }
            );
            assert_eq!(got.len(), fds.len());
            for (g, f) in got.iter().zip(fds) {
                assert!(same_file(g.as_fd(), *f));
            }
        }
        assert_nothing_pending(&b);
    });
}

#[test]
fn batch_send_stops_before_a_frame_out_of_bounds() {
    no_leak(|| {
        let (a, b) = Channel::pair().unwrap();
        let ends = pipes(MAX_FDS + 1);
        let ok = frame::encode(&Msg::Nothing).unwrap();
        let none: Vec<BorrowedFd<'_>> = Vec::new();
        let many: Vec<BorrowedFd<'_>> = ends.iter().map(|(r, _)| r.as_fd()).collect();
        let frames = [
            (ok.clone(), none.clone()),
            (ok.clone(), many),
            (ok, none.clone()),
        ];
        let sent = a
            .try_send_frames(frames.iter().map(|(b, f)| (b, f.as_slice())))
            .unwrap();
        assert_eq!(sent, 1);
        assert!(matches!(
            a.try_send_frames(frames[1..].iter().map(|(b, f)| (b, f.as_slice()))),
            Err(ChannelError::Frame(FrameError::TooManyFds { .. }))
        ));
        assert!(matches!(
            a.try_send_frames([(&Vec::<u8>::new(), none.as_slice())]),
            Err(ChannelError::Frame(FrameError::Empty))
        ));
        assert_eq!(b.try_recv::<Msg>().unwrap().0, Msg::Nothing);
        assert_nothing_pending(&b);
    });
}

#[test]
fn batch_send_reports_back_pressure() {
    no_leak(|| {
        let (a, _b) = Channel::pair().unwrap();
        let blob = frame::encode(&Msg::Blob(vec![0; 4096])).unwrap();
        let none: [BorrowedFd<'_>; 0] = [];
        let frames: Vec<(&Vec<u8>, &[BorrowedFd<'_>])> = vec![(&blob, &none[..]); SEND_BATCH];
        let mut total = 0;
        loop {
            match a.try_send_frames(frames.iter().copied()) {
                Ok(n) => total += n,
                Err(ChannelError::WouldBlock) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(total < 100_000, "never filled");
        }
        assert!(total > 0);
    });
}

fn is_open(raw: RawFd) -> bool {
    // SAFETY: F_GETFD only queries the fd table.
    unsafe { libc::fcntl(raw, libc::F_GETFD) >= 0 }
}

#[test]
fn close_fds_closes_exactly_the_given_fds() {
    no_leak(|| {
        // Contiguous runs and gaps, with bystanders in the gaps that must stay open.
        // Consecutive numbers (dup'ed to the lowest free ones from 900 up), so the doomed
        // ones form runs of 3, 3 and 3 and the close_range path is really taken.
        let null = File::open("/dev/null").unwrap();
        let files: Vec<OwnedFd> = (0..12)
            .map(|i| {
                let fd = fcntl(&null, FcntlArg::F_DUPFD_CLOEXEC(900 + i)).unwrap();
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect();
        drop(null);
        let raws: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        assert!(
            raws.windows(2).all(|w| w[1] == w[0] + 1),
            "not consecutive: {raws:?}"
        );
        let mut doomed = Vec::new();
        let mut kept = Vec::new();
        for (i, f) in files.into_iter().enumerate() {
            if [3, 7, 8].contains(&i) {
                kept.push(f);
            } else {
                doomed.push(f);
            }
        }
        doomed.reverse(); // order does not matter
        close_fds(&mut doomed);
        assert!(doomed.is_empty());
        for (i, raw) in raws.iter().enumerate() {
            assert_eq!(is_open(*raw), [3, 7, 8].contains(&i), "fd index {i}");
        }
        drop(kept);
        let mut empty = Vec::new();
        close_fds(&mut empty);
        let mut one = vec![OwnedFd::from(File::open("/dev/null").unwrap())];
        close_fds(&mut one);
    });
}
