//! The L1 side of `bulkhead-rootfs bench wl` apart from the driver: messages with fds over
//! Unix sockets, the peers the virtio_wl figures are compared with (a socketpair between two
//! threads on L1, virtio-vsock to a guest under QEMU, memcpy on L1), and CPU pinning. Used by
//! `bulkhead-bench-wl` inside the bench host.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The round trips' message.
pub const MSG: [u8; 64] = [7; 64];
const MAX_FDS: usize = 28;

fn err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e}")
}

/// One message and the fds it carried (owned; dropping them closes them).
pub fn recv_msg(sock: BorrowedFd<'_>) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(err("recvmsg"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(err("cmsgs"))? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: fds received by SCM_RIGHTS are new and owned by nobody else.
            fds.extend(
                list.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let n = msg.bytes;
    buf.truncate(n);
    Ok((buf, fds))
}

/// Sends one message with `fds` (SCM_RIGHTS).
pub fn send_msg(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), String> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(err("sendmsg"))?;
    if n != data.len() {
        return Err(format!("short send: {n} of {}", data.len()));
    }
    Ok(())
}

/// Receives one text message (an error on a hang-up).
pub fn recv_text(sock: &UnixStream) -> Result<(String, Vec<OwnedFd>), String> {
    let (data, fds) = recv_msg(sock.as_fd())?;
    if data.is_empty() && fds.is_empty() {
        return Err("the guest hung up".into());
    }
    Ok((String::from_utf8_lossy(&data).into_owned(), fds))
}

/// Sends one text message.
pub fn send_text(sock: &UnixStream, text: &str) -> Result<(), String> {
    send_msg(sock.as_fd(), text.as_bytes(), &[])
}

/// Puts this thread on CPU 0 only. The socketpair peers' two threads share one CPU: under
/// emulation a wake-up across vCPUs costs milliseconds and varies tenfold from run to run,
/// while on one CPU the figure is stable (and closer to what the same exchange costs on real
/// hardware either way).
pub fn pin_to_cpu0() {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    if set.set(0).is_ok() {
        let _ = sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Runs `f` with this thread on CPU 0, then gives it back its CPUs.
pub fn on_cpu0<T>(f: impl FnOnce() -> T) -> T {
    use nix::sched::{sched_getaffinity, sched_setaffinity};
    let me = nix::unistd::Pid::from_raw(0);
    let before = sched_getaffinity(me).ok();
    pin_to_cpu0();
    let result = f();
    if let Some(set) = before {
        let _ = sched_setaffinity(me, &set);
    }
    result
}

fn memfd(size: i64) -> Result<OwnedFd, String> {
    let fd = nix::sys::memfd::memfd_create(c"bench", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(err("memfd_create"))?;
    nix::unistd::ftruncate(&fd, size).map_err(err("ftruncate"))?;
    Ok(fd)
}

/// The L1 peer: an echo thread on one end of a socketpair.
pub struct SocketpairEcho {
    ours: UnixStream,
    memfd: OwnedFd,
    echo: std::thread::JoinHandle<Result<(), String>>,
}

impl SocketpairEcho {
    /// Starts the echo thread.
    pub fn start() -> Result<Self, String> {
        let (ours, theirs) = UnixStream::pair().map_err(err("socketpair"))?;
        let echo = std::thread::spawn(move || -> Result<(), String> {
            pin_to_cpu0();
            loop {
                let (data, fds) = recv_msg(theirs.as_fd())?;
                drop(fds);
                if data.is_empty() {
                    return Ok(());
                }
                send_msg(theirs.as_fd(), &data, &[])?;
            }
        });
        Ok(Self {
            ours,
            memfd: memfd(4096)?,
            echo,
        })
    }

    /// `n` round trips (with a 4 KiB memfd each if `with_fd`); the mean in ns.
    pub fn batch(&self, n: u32, with_fd: bool) -> Result<u128, String> {
        let fds: Vec<BorrowedFd<'_>> = if with_fd {
            vec![self.memfd.as_fd()]
        } else {
            Vec::new()
        };
        on_cpu0(|| {
            let start = Instant::now();
            for _ in 0..n {
                send_msg(self.ours.as_fd(), &MSG, &fds)?;
                let (data, _) = recv_msg(self.ours.as_fd())?;
                if data.len() != MSG.len() {
                    return Err(format!("echo of {} bytes", data.len()));
                }
            }
            Ok(start.elapsed().as_nanos() / u128::from(n.max(1)))
        })
    }

    /// Stops the echo thread.
    pub fn finish(self) -> Result<(), String> {
        drop(self.ours);
        self.echo
            .join()
            .map_err(|_| "the echo thread panicked".to_string())?
    }
}

/// Reads `total` bytes (closing any fds) from `from`, then answers `got`.
pub fn sink(from: &UnixStream, total: usize) -> Result<(), String> {
    let mut got = 0;
    while got < total {
        let (data, fds) = recv_msg(from.as_fd())?;
        drop(fds);
        if data.is_empty() {
            return Err(format!("hung up after {got} of {total} bytes"));
        }
        got += data.len();
    }
    if got != total {
        return Err(format!("{got} bytes, expected {total}"));
    }
    send_text(from, "got")
}

/// `messages` sends of `bytes` each (with a memfd each if `with_fd`) over a socketpair to a
/// reader thread here, which answers `got` at the end; the time in ns.
pub fn socketpair_tput(messages: u32, bytes: usize, with_fd: bool) -> Result<u128, String> {
    let (ours, theirs) = UnixStream::pair().map_err(err("socketpair"))?;
    let reader = std::thread::spawn(move || {
        pin_to_cpu0();
        sink(&theirs, messages as usize * bytes)
    });
    let memfd = memfd(0)?;
    let fds: Vec<BorrowedFd<'_>> = if with_fd {
        vec![memfd.as_fd()]
    } else {
        Vec::new()
    };
    let data = vec![9u8; bytes];
    let (got, ns) = on_cpu0(|| {
        let start = Instant::now();
        for _ in 0..messages {
            send_msg(ours.as_fd(), &data, &fds)?;
        }
        let (got, _) = recv_text(&ours)?;
        Ok::<_, String>((got, start.elapsed().as_nanos()))
    })?;
    reader
        .join()
        .map_err(|_| "the sink thread panicked".to_string())??;
    if got != "got" {
        return Err(format!("expected got, got {got:?}"));
    }
    Ok(ns)
}

/// The best of `reps` memcpys of `bytes` between two buffers here (ns).
pub fn memcpy_ns(bytes: usize, reps: u8) -> u128 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut best = u128::MAX;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(start.elapsed().as_nanos());
    }
    best
}

/// The vsock peer: a guest under QEMU with `vhost-vsock-pci` connected to us over AF_VSOCK.
/// Line commands go to it; it does the round trips and reports its mean.
pub struct VsockPeer {
    conn: BufReader<std::fs::File>,
}

/// An AF_VSOCK listener on this host (any CID).
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port`.
    pub fn bind(port: u32) -> Result<Self, String> {
        use nix::sys::socket::VsockAddr;
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
        const VMADDR_CID_ANY: u32 = u32::MAX;
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(err("socket(AF_VSOCK)"))?;
        bind(fd.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
            .map_err(err("bind(AF_VSOCK)"))?;
        listen(&fd, Backlog::new(1).map_err(err("backlog"))?).map_err(err("listen"))?;
        Ok(Self(fd))
    }

    /// Waits up to a second for the guest; `None` if it has not connected yet.
    pub fn accept_within_a_second(&self) -> Result<Option<VsockPeer>, String> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(1000u16)).map_err(err("poll"))? == 0 {
            return Ok(None);
        }
        let fd = nix::sys::socket::accept(self.0.as_raw_fd()).map_err(err("accept(AF_VSOCK)"))?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Some(VsockPeer {
            conn: BufReader::new(file),
        }))
    }
}

impl VsockPeer {
    /// `n` round trips driven by the guest (we echo); the guest's mean in ns.
    pub fn batch(&mut self, n: u32) -> Result<u128, String> {
        self.conn
            .get_mut()
            .write_all(format!("rtt {n}\n").as_bytes())
            .map_err(err("vsock send"))?;
        let mut msg = [0u8; MSG.len()];
        for _ in 0..n {
            self.conn.read_exact(&mut msg).map_err(err("vsock recv"))?;
            self.conn
                .get_mut()
                .write_all(&msg)
                .map_err(err("vsock echo"))?;
        }
        let mut line = String::new();
        self.conn.read_line(&mut line).map_err(err("vsock recv"))?;
        line.trim()
            .strip_prefix("rtt-done ")
            .and_then(|ns| ns.parse().ok())
            .ok_or_else(|| format!("vsock guest: expected rtt-done, got {line:?}"))
    }

    /// Tells the guest to end.
    pub fn done(mut self) -> Result<(), String> {
        self.conn
            .get_mut()
            .write_all(b"done\n")
            .map_err(err("vsock send"))
    }
}
