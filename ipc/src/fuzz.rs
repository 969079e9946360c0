//! The body of the `hub_frames` fuzz target (`ipc/fuzz`), also run over its seeds by
//! `ipc/tests/fuzz_seeds.rs`: arbitrary datagrams from a VMM on a hub connection (sends, parts
//! of sends, garbage) against a real hub, in-process on a thread. Whatever they are, the hub
//! must go on: after them, a good send gets its `Accepted` verdict and is delivered.

use std::os::fd::{AsFd, AsRawFd};

use bulkhead_policy::RootDir;
use nix::sys::socket::{send, MsgFlags};

use crate::channel::{Channel, ChannelError};
use crate::frame::{MAX_FRAME, WIRE_VERSION};
use crate::hub::budget::Budgets;
use crate::hub::protocol::{ConnBatch, ConnEvent, ConnSend, HubEvent, Name, Refusal, VmRequest};
use crate::hub::{Hub, HubConfig};

const POLICY: &str = "version 1
grant a provide svc c2s=memfd:ro,pipe:w s2c=memfd:ro max-fds=8
grant b connect svc@a
grant @any quota shm=1MiB shm-count=16 vfds=64
";

/// A hub with VM `b` connected to `a`'s service, kept across inputs.
pub struct HubFrames {
    _dir: tempfile_free::Dir,
    _vms: (Channel, Channel),
    /// `b`'s end of the connection (sends go here).
    sender: Channel,
    /// `a`'s end.
    receiver: Channel,
    seq: u32,
}

/// A directory removed on drop, without a dev-dependency in the library.
mod tempfile_free {
    use std::path::PathBuf;

    pub struct Dir(pub PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn name(s: &str) -> Name {
    let mut n = Name::new();
    for c in s.chars() {
        let _ = n.push(c);
    }
    n
}

fn guard(ch: &Channel) {
    let tv = nix::sys::time::TimeVal::new(10, 0);
    let _ =
        nix::sys::socket::setsockopt(&ch.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &tv);
}

impl HubFrames {
    /// Starts the hub and makes the connection. Panics if it cannot (a harness, not the
    /// hub).
    #[allow(clippy::expect_used, clippy::unwrap_used)]
    pub fn new() -> HubFrames {
        let dir = std::env::temp_dir().join(format!("bulkhead-hub-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10-fuzz.policy"), POLICY).unwrap();
        let (a_vmm, a_hub) = Channel::pair().unwrap();
        let (b_vmm, b_hub) = Channel::pair().unwrap();
        let cfg = HubConfig {
            roots: RootDir::staging(&dir),
            audit: Some(dir.join("audit.jsonl")),
            control_socket: None,
            exit_when_no_vms: true,
            budgets: Budgets::default(),
        };
        let mut hub = Hub::new(cfg, vec![("a".into(), a_hub), ("b".into(), b_hub)]).unwrap();
        std::thread::spawn(move || {
            let _ = hub.run();
        });
        for ch in [&a_vmm, &b_vmm] {
            guard(ch);
        }
        a_vmm
            .send(
                &VmRequest::Provide {
                    tag: 1,
                    service: name("svc"),
                },
                &[],
            )
            .unwrap();
        assert!(matches!(
            a_vmm.recv::<HubEvent>().unwrap().0,
            HubEvent::Provided { .. }
        ));
        b_vmm
            .send(
                &VmRequest::Connect {
                    tag: 2,
                    service: name("svc"),
                    provider: None,
                },
                &[],
            )
            .unwrap();
        let (ev, mut fds) = b_vmm.recv::<HubEvent>().unwrap();
        assert!(matches!(ev, HubEvent::Connected { .. }), "{ev:?}");
        let sender = Channel::from_fd(fds.pop().unwrap());
        let (ev, mut fds) = a_vmm.recv::<HubEvent>().unwrap();
        assert!(matches!(ev, HubEvent::Accept { .. }), "{ev:?}");
        let receiver = Channel::from_fd(fds.pop().unwrap());
        guard(&sender);
        guard(&receiver);
        HubFrames {
            _dir: tempfile_free::Dir(dir),
            _vms: (a_vmm, b_vmm),
            sender,
            receiver,
            seq: 1 << 30,
        }
    }

    /// Splits `data` into datagrams (each: a length byte, then that many bytes, at most 127; with the
    /// length's top bit clear the wire version is put in front, so most inputs reach the
    /// decoder) and sends them, then a good send; the hub must accept and deliver it.
    #[allow(clippy::unwrap_used, clippy::panic)]
    pub fn exercise(&mut self, mut data: &[u8]) {
        let mut sent = 0;
        while let Some((&len, rest)) = data.split_first() {
            let n = usize::from(len & 0x7f);
            let (body, rest) = rest.split_at(n.min(rest.len()));
            data = rest;
            let mut dgram = Vec::with_capacity(body.len() + 1);
            if len & 0x80 == 0 {
                dgram.push(WIRE_VERSION);
            }
            dgram.extend_from_slice(body);
            if dgram.is_empty() || dgram.len() > MAX_FRAME {
                continue;
            }
            // The hub reads while it has room for verdicts; a full socket means it stopped
            // (this harness reads no verdicts until the end): enough for one input.
            match send(self.sender.as_raw_fd(), &dgram, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => sent += 1,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("send: {e}"),
            }
            if sent >= 64 {
                break;
            }
        }
        // A good send: accepted (after the verdicts on everything before it), or Busy while
        // the receiver's queue is full of what came before; then the receiver drains and it
        // goes again.
        loop {
            self.seq = self.seq.wrapping_add(1);
            let good = ConnSend {
                seq: self.seq,
                data: b"ok".to_vec(),
                rights: heapless::Vec::new(),
                part: 0,
                more: false,
            };
            self.sender.send(&good, &[]).unwrap();
            let accepted = loop {
                let (batch, _fds) = match self.sender.recv::<ConnBatch>() {
                    Ok(b) => b,
                    Err(ChannelError::Frame(e)) => panic!("the hub sent a bad frame: {e}"),
                    Err(e) => panic!("the hub stopped answering: {e}"),
                };
                let mine = batch.iter().find_map(|e| match e {
                    ConnEvent::Accepted { seq } if *seq == self.seq => Some(true),
                    ConnEvent::Refused { seq, error } if *seq == self.seq => {
                        assert_eq!(*error, Refusal::Busy, "a good send refused");
                        Some(false)
                    }
                    _ => None,
                });
                if let Some(a) = mine {
                    break a;
                }
            };
            if accepted {
                break;
            }
            while self.receiver.try_recv::<ConnBatch>().is_ok() {}
        }
        // Its delivery comes after everything accepted before it.
        loop {
            let (batch, _fds) = self.receiver.recv::<ConnBatch>().unwrap();
            if batch
                .iter()
                .any(|e| matches!(e, ConnEvent::Deliver { data, .. } if data == b"ok"))
            {
                break;
            }
        }
    }
}

impl Default for HubFrames {
    fn default() -> Self {
        HubFrames::new()
    }
}
