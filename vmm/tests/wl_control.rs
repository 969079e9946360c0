//! virtio_wl sockets at run time: `wl add` over the real control socket (socketpair channel,
//! fd by SCM_RIGHTS) is answered while the device is not yet activated, names follow the
//! `wl-conn-%d` pattern, and once the device's worker thread runs, the guest (mock queues)
//! connects to the added name and receives what the host end sends.

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::control::{ControlRequest, ControlResponse, ControlServer, ControlTarget};
use bulkhead_vmm::devices::acpi::ged::PowerButton;
use bulkhead_vmm::devices::virtio::wl::device::{Wl, IN_QUEUE, OUT_QUEUE};
use bulkhead_vmm::devices::virtio::wl::protocol::*;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm::devices::virtio::{
    Activation, ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use bulkhead_vmm::vstate::exit::ExitSignal;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn ask(c: &Channel, req: &ControlRequest, fds: &[OwnedFd]) -> ControlResponse {
    use std::os::fd::AsFd;
    let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    c.send(req, &b).unwrap();
    c.recv::<ControlResponse>().unwrap().0
}

struct Irq([EventFd; 2]);
impl VirtioInterrupt for Irq {
    fn notify_queue(&self, index: usize) {
        if let Some(e) = self.0.get(index) {
            e.write(1).unwrap();
        }
    }
    fn notify_config(&self) {}
}

#[test]
fn wl_add_before_activation_then_the_guest_connects() {
    let wl_sockets = WlSockets::new();
    let mut wl = Wl::new(wl_sockets.clone(), None, WlLimits::default()).unwrap();
    let target = Arc::new(ControlTarget::new(
        Arc::new(ExitSignal::new().unwrap()),
        Arc::new(PowerButton::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        1,
        64 << 20,
        vec!["virtio-wl".into()],
    ));
    let (client, server) = Channel::pair().unwrap();
    let _srv = ControlServer::start(target.clone(), None, Some(server)).unwrap();
    // Before the registry is attached, `wl add` is refused with an answer.
    assert!(matches!(
        ask(
            &client,
            &ControlRequest::WlAdd {
                name: "x".into(),
                path: None
            },
            &[]
        ),
        ControlResponse::Error(_)
    ));
    target.set_wl_sockets(wl.sockets().clone());

    // Device not activated: requests are still answered.
    let (vm_end0, mut host_end0) = UnixStream::pair().unwrap();
    let (vm_end1, _host_end1) = UnixStream::pair().unwrap();
    let add = ControlRequest::WlAdd {
        name: "wl-conn-%d".into(),
        path: None,
    };
    assert_eq!(
        ask(&client, &add, &[OwnedFd::from(vm_end0)]),
        ControlResponse::WlAdded("wl-conn-0".into())
    );
    assert_eq!(
        ask(&client, &add, &[OwnedFd::from(vm_end1)]),
        ControlResponse::WlAdded("wl-conn-1".into())
    );
    assert_eq!(
        ask(
            &client,
            &ControlRequest::WlAdd {
                name: "wayland".into(),
                path: Some("/nonexistent/wayland-0".into())
            },
            &[]
        ),
        ControlResponse::WlAdded("wayland".into())
    );
    assert!(matches!(
        ask(
            &client,
            &ControlRequest::WlAdd {
                name: "y".into(),
                path: None
            },
            &[]
        ),
        ControlResponse::Error(_)
    ));
    assert_eq!(wl_sockets.names(), ["wayland", "wl-conn-0", "wl-conn-1"]);

    // The guest: NEW_CTX_NAMED "wl-conn-0" posted before activation, 4 in-queue buffers.
    let mem = common::memory();
    let mut cmd = vec![0u8; 64];
    cmd[..4].copy_from_slice(&CMD_VFD_NEW_CTX_NAMED.to_le_bytes());
    cmd[8..12].copy_from_slice(&7u32.to_le_bytes());
    cmd[28..37].copy_from_slice(b"wl-conn-0");
    mem.write_slice(&cmd, GuestAddress(0x20_0000)).unwrap();
    let out = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    out.add_desc_chains(
        &common::chain(0, &[(0x20_0000, 64, false), (0x30_0000, 64, true)]),
        0,
    )
    .unwrap();
    let inq = MockSplitQueue::create(&mem, GuestAddress(0x80000), 16);
    let bufs: Vec<RawDescriptor> = (0..4u64)
        .map(|i| {
            RawDescriptor::from(SplitDescriptor::new(
                0x40_0000 + i * 4096,
                4096,
                common::WRITE,
                0,
            ))
        })
        .collect();
    inq.add_desc_chains(&bufs, 0).unwrap();
    let irq = Arc::new(Irq([
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]));
    let in_q: Queue = inq.create_queue().unwrap();
    let out_q: Queue = out.create_queue().unwrap();
    wl.activate(Activation {
        mem: mem.clone(),
        features: VIRTIO_F_VERSION_1 | VIRTIO_WL_F_TRANS_FLAGS,
        queues: vec![
            ActiveQueue {
                index: IN_QUEUE,
                queue: in_q,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
            ActiveQueue {
                index: OUT_QUEUE,
                queue: out_q,
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            },
        ],
        interrupt: irq.clone(),
    })
    .unwrap();
    assert!(
        common::wait_readable(&irq.0[OUT_QUEUE]),
        "response interrupt"
    );
    let resp: u32 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(resp, RESP_VFD_NEW);
    assert_eq!(wl_sockets.names(), ["wayland", "wl-conn-1"], "consumed");

    // The host end talks; the worker reads it into an in-queue buffer.
    host_end0.write_all(b"accepted").unwrap();
    assert!(
        common::wait_readable(&irq.0[IN_QUEUE]),
        "in-queue interrupt"
    );
    let e = inq.used().ring().ref_at(0).unwrap().load();
    let mut b = vec![0u8; e.len() as usize];
    mem.read_slice(&mut b, GuestAddress(0x40_0000 + u64::from(e.id()) * 4096))
        .unwrap();
    assert_eq!(
        parse_in_message(&b),
        Some(InMessage::Recv {
            id: 7,
            vfds: vec![],
            data: b"accepted".to_vec()
        })
    );
    // Reset stops the worker and closes the vfd: the host end sees EOF.
    wl.reset();
    let mut rest = Vec::new();
    host_end0.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn wl_socket_flag_parsing() {
    use bulkhead_vmm::config::parse_wl_socket;
    assert_eq!(
        parse_wl_socket("wayland=/run/w=0").unwrap(),
        ("wayland".to_string(), "/run/w=0".into())
    );
    assert_eq!(
        parse_wl_socket("/run/hub.sock").unwrap(),
        (String::new(), "/run/hub.sock".into())
    );
    assert!(parse_wl_socket("x=").is_err());
    assert!(parse_wl_socket("wl-%d=/p").is_err());
    assert!(parse_wl_socket(&format!("{}=/p", "n".repeat(33))).is_err());
}

#[test]
fn vmmctl_wl_add_hands_over_a_connection_or_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("vm.sock");
    let svc = dir.path().join("svc.sock");
    let listener = std::os::unix::net::UnixListener::bind(&svc).unwrap();
    let sockets = WlSockets::new();
    let target = Arc::new(ControlTarget::new(
        Arc::new(ExitSignal::new().unwrap()),
        Arc::new(PowerButton::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        1,
        64 << 20,
        vec![],
    ));
    target.set_wl_sockets(sockets.clone());
    let _srv = ControlServer::start(target, Some(&ctl), None).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-vmmctl"))
            .arg(&ctl)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let name = run(&["wl-add", "--connect", svc.to_str().unwrap()]);
    assert_eq!(name.trim(), "wl-conn-0");
    let (mut accepted, _) = listener.accept().unwrap();
    let name = run(&["wl-add", "--name", "wayland", "--path", "/run/w"]);
    assert_eq!(name.trim(), "wayland");
    assert_eq!(sockets.names(), ["wayland", "wl-conn-0"]);
    // The handed-over connection is the one the service accepted.
    let mut s = sockets.connect("wl-conn-0").unwrap();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    accepted.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}

/// `wl add` with an fd that is not a stream socket (a pipe, a regular file, a datagram
/// socket) is refused with a clear error over the real control socket, and no name is added.
#[test]
fn wl_add_refuses_fds_that_are_not_stream_sockets() {
    let sockets = WlSockets::new();
    let target = Arc::new(ControlTarget::new(
        Arc::new(ExitSignal::new().unwrap()),
        Arc::new(PowerButton::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        1,
        64 << 20,
        vec![],
    ));
    target.set_wl_sockets(sockets.clone());
    let (client, server) = Channel::pair().unwrap();
    let _srv = ControlServer::start(target, None, Some(server)).unwrap();
    let add = ControlRequest::WlAdd {
        name: "wl-conn-%d".into(),
        path: None,
    };
    let (r, _w) = std::io::pipe().unwrap();
    let file = tempfile::tempfile().unwrap();
    let (dgram, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
    for (fd, want) in [
        (OwnedFd::from(r), "not a socket (it is a pipe)"),
        (OwnedFd::from(file), "not a socket (it is a regular file)"),
        (OwnedFd::from(dgram), "not SOCK_STREAM"),
    ] {
        match ask(&client, &add, &[fd]) {
            ControlResponse::Error(e) => assert!(e.contains(want), "{e:?} lacks {want:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(sockets.names().is_empty(), "{:?}", sockets.names());
    // A stream socket is still taken.
    let (a, _b) = UnixStream::pair().unwrap();
    assert_eq!(
        ask(&client, &add, &[OwnedFd::from(a)]),
        ControlResponse::WlAdded("wl-conn-0".into())
    );
}

/// `--wl-socket-fd NAME=FD` (a jailed VMM's host socket, handed over by init): a descriptor
/// that is not a connected stream socket stops the VMM at start with a message naming it,
/// before the guest runs.
#[test]
fn a_wl_socket_fd_that_is_not_a_stream_socket_stops_the_vmm() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) writes two descriptors into `fds`; no O_CLOEXEC, so the child inherits
    // them.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kernel", "/proc/self/exe", "--serial", "none"])
        .arg("--wl-socket-fd")
        .arg(format!("peer={}", fds[0]))
        .output()
        .unwrap();
    // SAFETY: both ends are ours and used no more.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains(&format!("--wl-socket-fd peer={}", fds[0])) && stderr.contains("socket"),
        "{stderr}"
    );
}
