//! virtio-net through the real `bulkhead-vmm` binary on this machine's /dev/kvm: a hand-made
//! bzImage whose 64-bit code finds the virtio-net function on the PCI bus (1af4:1041),
//! places its BAR, prints the MAC from its config space and waits for the link-status bit.
//! The VMM gets its hub channel as a pre-opened fd (as init hands it over) to a real hub
//! (the `bulkhead_ipc::hub::Hub` on a thread of this test); this test is the net VM that
//! provides `net`. So: the VMM connects to `net@netvm` at start, by itself, the MAC comes
//! from `--net-mac`, and the guest sees the link up once the connection stands.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use bulkhead_ipc::channel::{Channel, ChannelError};
use bulkhead_ipc::hub::budget::Budgets;
use bulkhead_ipc::hub::client::{ClientError, HubConn, Incoming};
use bulkhead_ipc::hub::protocol::{HubEvent, Name, VmRequest};
use bulkhead_ipc::hub::{Hub, HubConfig};
use bulkhead_netring::{attach, Hello, Mapping};
use bulkhead_policy::RootDir;

/// A bzImage: 2 setup sectors' worth of header, then the "kernel" (entry at +0x200).
fn fake_bzimage(code64: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01;
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&0x800u32.to_le_bytes());
    let mut kernel = vec![0xf4u8; 0x200];
    kernel.extend_from_slice(code64);
    img.extend_from_slice(&kernel);
    img
}

/// A few x86-64 instructions with labels for short jumps.
#[derive(Default)]
struct Asm {
    code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn b(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }
    fn label(&mut self, l: &'static str) -> &mut Self {
        self.labels.push((l, self.code.len()));
        self
    }
    /// A short jump (opcode 0xeb, 0x74 je, 0x75 jne) to `l`.
    fn j(&mut self, op: u8, l: &'static str) -> &mut Self {
        self.code.push(op);
        self.fixups.push((self.code.len(), l));
        self.code.push(0);
        self
    }
    fn dx(&mut self, port: u16) -> &mut Self {
        let p = port.to_le_bytes();
        self.b(&[0x66, 0xba, p[0], p[1]])
    }
    fn eax(&mut self, v: u32) -> &mut Self {
        self.code.push(0xb8);
        self.b(&v.to_le_bytes())
    }
    /// eax = the config address of device `ecx`, register `reg`.
    fn cfg_addr(&mut self, reg: u8) -> &mut Self {
        self.b(&[0x89, 0xc8]) // mov eax, ecx
            .b(&[0xc1, 0xe0, 0x0b]) // shl eax, 11
            .b(&[0x0d, reg, 0, 0, 0x80]) // or eax, 0x80000000 | reg
    }
    fn finish(&mut self) -> Vec<u8> {
        for (at, l) in &self.fixups {
            let target = self.labels.iter().find(|(n, _)| n == l).unwrap().1;
            let rel = target as isize - (*at as isize + 1);
            self.code[*at] = i8::try_from(rel).unwrap() as u8;
        }
        self.code.clone()
    }
}

const BAR: u32 = 0x3000_0000;

/// Finds 1af4:1041 on bus 0, puts its BAR 0 at `BAR`, enables memory decoding, prints the
/// six MAC bytes of its config space (BAR 0 + 0x2000), polls the status word (+0x2006)
/// until LINK_UP, prints `U` (or `D` after ~4M polls), powers off.
fn net_probe() -> Vec<u8> {
    let mut a = Asm::default();
    a.b(&[0xb9, 1, 0, 0, 0]) // mov ecx, 1
        .label("scan")
        .cfg_addr(0)
        .dx(0xcf8)
        .b(&[0xef]) // out dx, eax
        .dx(0xcfc)
        .b(&[0xed]) // in eax, dx
        .b(&[0x3d, 0xf4, 0x1a, 0x41, 0x10]) // cmp eax, 0x10411af4
        .j(0x74, "found")
        .b(&[0xff, 0xc1]) // inc ecx
        .b(&[0x83, 0xf9, 0x20]) // cmp ecx, 32
        .j(0x75, "scan")
        .dx(0x3f8)
        .b(&[0xb0, b'?', 0xee]) // no device: '?'
        .j(0xeb, "off")
        .label("found")
        .cfg_addr(0x10)
        .dx(0xcf8)
        .b(&[0xef])
        .eax(BAR)
        .dx(0xcfc)
        .b(&[0xef])
        .cfg_addr(0x04)
        .dx(0xcf8)
        .b(&[0xef])
        .eax(0x6)
        .dx(0xcfc)
        .b(&[0xef])
        .b(&[0xbb])
        .b(&(BAR + 0x2000).to_le_bytes()) // mov ebx, BAR + 0x2000
        .dx(0x3f8);
    for i in 0..6u8 {
        a.b(&[0x8a, 0x43, i, 0xee]); // mov al, [rbx+i]; out dx, al
    }
    a.b(&[0xb9, 0, 0, 0x40, 0]) // mov ecx, 0x400000
        .label("poll")
        .b(&[0x66, 0x8b, 0x43, 0x06]) // mov ax, [rbx+6]
        .b(&[0xa8, 0x01]) // test al, 1
        .j(0x75, "up")
        .b(&[0xf3, 0x90]) // pause
        .b(&[0xff, 0xc9]) // dec ecx
        .j(0x75, "poll")
        .b(&[0xb0, b'D', 0xee])
        .j(0xeb, "off")
        .label("up")
        .b(&[0xb0, b'U', 0xee])
        .label("off")
        .dx(0x600)
        .b(&[0xb0, 0x34, 0xee, 0xf4]); // S5; hlt
    a.finish()
}

fn inheritable(fd: i32) -> i32 {
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns, so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    fd
}

#[test]
fn the_vmm_connects_at_start_and_a_guest_sees_the_mac_and_the_link_up() {
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("policy.d");
    std::fs::create_dir(&pdir).unwrap();
    std::fs::write(
        pdir.join("10-net.policy"),
        "version 1\ngrant netvm provide net c2s=memfd:rw max-fds=1\n\
         grant app connect net@netvm\ngrant @any quota shm=8MiB shm-count=8 vfds=16\n",
    )
    .unwrap();
    let (netvm, netvm_hub) = Channel::pair().unwrap();
    let (app, app_hub) = Channel::pair().unwrap();
    let mut hub = Hub::new(
        HubConfig {
            roots: vec![RootDir {
                path: pdir,
                prefix: String::new(),
                required: true,
            }],
            audit: Some(dir.path().join("audit.jsonl")),
            control_socket: None,
            exit_when_no_vms: true,
            budgets: Budgets::new(64, 16),
        },
        vec![("netvm".into(), netvm_hub), ("app".into(), app_hub)],
    )
    .unwrap();
    let hub_thread = std::thread::spawn(move || hub.run().unwrap());
    netvm
        .send(
            &VmRequest::Provide {
                tag: 1,
                service: Name::try_from("net").unwrap(),
            },
            &[],
        )
        .unwrap();
    assert!(matches!(
        netvm.recv::<HubEvent>().unwrap().0,
        HubEvent::Provided { tag: 1 }
    ));

    let kernel_path = dir.path().join("bzImage");
    std::fs::write(&kernel_path, fake_bzimage(&net_probe())).unwrap();
    let serial_path = dir.path().join("serial");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .unwrap();
    let kernel = File::open(&kernel_path).unwrap();
    let mut serial = File::create(&serial_path).unwrap();
    serial.flush().unwrap();
    let app_fd: OwnedFd = app.into_fd();
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead-vmm"))
        .args(["--kvm-fd", &inheritable(kvm.as_raw_fd()).to_string()])
        .args(["--kernel-fd", &inheritable(kernel.as_raw_fd()).to_string()])
        .args(["--serial-fd", &inheritable(serial.as_raw_fd()).to_string()])
        .args(["--hub-fd", &inheritable(app_fd.as_raw_fd()).to_string()])
        .args(["--net", "net@netvm", "--net-mac", "52:54:00:ab:cd:ef"])
        .args(["--memory", "64M", "--serial-input", "false"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(app_fd);

    // The net VM's side: the VMM's connection arrives by itself, with the ring.
    netvm.set_nonblocking(true).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let conn_fd = loop {
        match netvm.try_recv::<HubEvent>() {
            Ok((HubEvent::Accept { .. }, mut fds)) => break fds.pop().unwrap(),
            Ok(_) | Err(ChannelError::WouldBlock) => {
                assert!(Instant::now() < end, "the VMM did not connect to net@netvm");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut conn = HubConn::from_fd(conn_fd).unwrap();
    let (hello, mut fds) = loop {
        match conn.try_recv() {
            Ok(Incoming::Message { data, fds }) => break (data, fds),
            Ok(_) | Err(ClientError::Channel(ChannelError::WouldBlock)) => {
                assert!(Instant::now() < end, "no hello");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let hello = Hello::decode(&hello).unwrap();
    let map = Mapping::map(
        std::os::fd::AsFd::as_fd(&fds.pop().unwrap().0),
        hello.ring_len as usize,
    )
    .unwrap();
    assert_eq!(
        attach(map.mem()).unwrap().mac,
        [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
    );

    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("virtio-net: link up (net@netvm"),
        "{stderr}"
    );
    assert!(stderr.contains("is virtio-net"), "{stderr}");
    // The link thread did its work under the worker's seccomp filter (the default, kill).
    assert!(
        stderr.contains("seccomp filters installed (Kill mode)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&serial_path).unwrap(),
        b"\x52\x54\x00\xab\xcd\xefU",
        "MAC then link up"
    );
    drop(conn);
    drop(netvm);
    hub_thread.join().unwrap();
    drop((kvm, kernel, serial));
}
