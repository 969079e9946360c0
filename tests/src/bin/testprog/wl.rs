//! The two ends of the virtio_wl end-to-end test: `wl-guest` runs inside an L2 guest and talks
//! through /dev/wl0; `wl-peer PATH` runs on the L1 host and is the socket the guest's
//! named context connects to. Between them: data, a shared-memory buffer both sides write
//! (zero copy: a write after sending is seen by the other side), a host memfd, and a pipe
//! in each direction with its hang-up (EOF and POLLHUP). The guest also checks the driver's
//! errors: ENOTTY for a dmabuf, ENODEV for an unknown name, EINVAL for an mmap beyond an
//! allocation, EAGAIN for a non-blocking recv with nothing queued. The pipe to the host is
//! written as under ChromiumOS's driver, where a guest's write pipe may be an O_RDONLY file
//! (fault injection: `write(2)` on it is refused with EBADF), which `bulkhead-wl` writes
//! through `VIRTWL_IOCTL_SEND`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

pub type Res = Result<String, String>;

pub fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// Reads a NUL-terminated string at `off` in a mapping.
pub fn cstr_at(map: &[u8], off: usize) -> String {
    let tail = map.get(off..).unwrap_or(&[]);
    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

pub fn put_cstr(map: &mut [u8], off: usize, s: &str) {
    if let Some(dst) = map.get_mut(off..off + s.len() + 1) {
        dst[..s.len()].copy_from_slice(s.as_bytes());
        dst[s.len()] = 0;
    }
}

fn wait_for(map: &[u8], off: usize, want: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // SAFETY: a volatile read of memory the other side writes, so the compiler re-reads.
        let seen = unsafe { std::ptr::read_volatile(map.as_ptr().add(off)) };
        if seen != 0 && cstr_at(map, off) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn errno_of(r: Result<impl Sized, bulkhead_wl::WlError>) -> Option<i32> {
    match r {
        Err(bulkhead_wl::WlError::Io { err, .. }) => err.raw_os_error(),
        _ => None,
    }
}

fn want_errno(what: &str, got: Option<i32>, want: i32) -> Result<(), String> {
    if got == Some(want) {
        Ok(())
    } else {
        Err(format!("{what}: expected errno {want}, got {got:?}"))
    }
}

/// Fault injection: ChromiumOS's driver gives a vfd file the access mode of the device's
/// answer flags, so a guest's write pipe can be O_RDONLY there and `write(2)` on it fails
/// with EBADF. On a thread of its own, a seccomp filter makes `write(2)` on this one fd fail
/// just so (checked first); `bulkhead-wl` must still get `data` through (it writes with
/// `VIRTWL_IOCTL_SEND`, as ChromiumOS programs do).
fn write_where_write2_is_refused(pipe: &bulkhead_wl::WlPipe, data: &[u8]) -> Result<(), String> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let fd = pipe.fd().as_raw_fd();
    let cond = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, fd as u64)
        .map_err(e("seccomp condition"))?;
    let rule = SeccompRule::new(vec![cond]).map_err(e("seccomp rule"))?;
    let filter = SeccompFilter::new(
        [(libc::SYS_write, vec![rule])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EBADF as u32),
        TargetArch::x86_64,
    )
    .map_err(e("seccomp filter"))?;
    let prog: BpfProgram = filter.try_into().map_err(e("seccomp program"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            seccompiler::apply_filter(&prog).map_err(e("apply the seccomp filter"))?;
            // SAFETY: a write of 1 byte from a live buffer; the filter refuses it.
            let r = unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            if r != -1 || errno != Some(libc::EBADF) {
                return Err(format!(
                    "the injected fault is not active: write(2) gave {r}, errno {errno:?}"
                ));
            }
            let mut w = pipe;
            w.write_all(data).map_err(e(
                "pipe write with write(2) refused (as on an O_RDONLY vfd)",
            ))
        })
        .join()
        .map_err(|_| "the pipe-writing thread panicked".to_string())?
    })
}

/// The driver's error answers that need no peer.
fn guest_errors(wl: &bulkhead_wl::Wl) -> Result<(), String> {
    use bulkhead_wl::uapi::{IoctlNew, IOCTL_NEW};
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/wl0")
        .map_err(e("open /dev/wl0"))?;
    let mut arg = IoctlNew {
        kind: 4, // VIRTWL_IOCTL_NEW_DMABUF: there is no GPU
        fd: -1,
        flags: 0,
        payload: [0; 36],
    };
    // SAFETY: IOCTL_NEW reads and writes one 48-byte IoctlNew, which `arg` is.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), IOCTL_NEW, &mut arg) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    want_errno("dmabuf", (r != 0).then_some(errno).flatten(), libc::ENOTTY)?;
    want_errno(
        "an unknown socket name",
        errno_of(wl.connect("no-such-socket")),
        libc::ENODEV,
    )?;
    let shm = wl.alloc(8192).map_err(e("alloc"))?;
    let dup = shm.fd().try_clone_to_owned().map_err(e("dup"))?;
    want_errno(
        "mmap beyond the allocation",
        errno_of(bulkhead_wl::SharedMemory::map(dup, 3 * 4096)),
        libc::EINVAL,
    )
}

/// The guest side.
pub fn guest() -> Res {
    let wl = bulkhead_wl::Wl::open().map_err(e("open /dev/wl0"))?;
    guest_errors(&wl)?;
    let stream = wl.connect("peer").map_err(e("connect to peer"))?;
    let mut shm = wl.alloc(8192).map_err(e("alloc"))?;
    put_cstr(shm.as_mut_slice(), 0, "guest-shm-data");
    let from_host = wl.pipe_read().map_err(e("pipe_read"))?;
    let to_host = wl.pipe_write().map_err(e("pipe_write"))?;
    stream
        .send(
            b"hello from guest",
            &[shm.fd(), from_host.fd(), to_host.fd()],
        )
        .map_err(e("send"))?;
    // Zero copy: written after the send, seen by the host.
    put_cstr(shm.as_mut_slice(), 100, "after-send");
    write_where_write2_is_refused(&to_host, b"guest-pipe-data")?;
    drop(to_host); // closing our end is the host's EOF
    let (data, fds) = stream.recv().map_err(e("recv"))?;
    if data != b"hello from host" || fds.len() != 1 {
        return Err(format!(
            "recv: {:?} with {} fds",
            String::from_utf8_lossy(&data),
            fds.len()
        ));
    }
    let mut host_mem = bulkhead_wl::SharedMemory::map(fds.into_iter().next().ok_or("no fd")?, 4096)
        .map_err(e("map the host memfd"))?;
    if cstr_at(host_mem.as_slice(), 0) != "host-memfd" {
        return Err("host memfd contents".into());
    }
    put_cstr(host_mem.as_mut_slice(), 200, "guest-wrote-host-memfd");
    if !wait_for(shm.as_slice(), 200, "host-was-here") {
        return Err("the host's write into our shared memory is not visible".into());
    }
    let mut got = String::new();
    (&from_host)
        .read_to_string(&mut got)
        .map_err(e("pipe read"))?;
    if got != "host-pipe-data" {
        return Err(format!("pipe from host gave {got:?}"));
    }
    let mut polled = [nix::poll::PollFd::new(
        from_host.fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut polled, nix::poll::PollTimeout::ZERO).map_err(e("poll the pipe"))?;
    let hup = polled[0]
        .revents()
        .is_some_and(|r| r.contains(nix::poll::PollFlags::POLLHUP));
    if !hup {
        return Err(format!(
            "the host closed its pipe end but poll gives {:?}",
            polled[0].revents()
        ));
    }
    // The host sends nothing until we say done.
    stream.set_nonblocking(true).map_err(e("nonblocking"))?;
    want_errno(
        "a non-blocking recv with nothing queued",
        errno_of(stream.recv()),
        libc::EAGAIN,
    )?;
    stream.set_nonblocking(false).map_err(e("blocking"))?;
    stream.send(b"done", &[]).map_err(e("send done"))?;
    Ok(
        "wl guest ok: data, shared memory both ways, host memfd, pipes both ways with POLLHUP \
        (the write pipe written with write(2) refused, as on ChromiumOS's driver), \
        ENOTTY/ENODEV/EINVAL/EAGAIN"
            .into(),
    )
}

pub fn recv_with_fds(sock: RawFd) -> Result<(Vec<u8>, Vec<OwnedFd>), String> {
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 28]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(e("recvmsg"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(e("cmsgs"))? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: SCM_RIGHTS fds are new and ours.
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

/// `fd=N`: a descriptor init handed over (`fds` in system.toml), owned from here on; any
/// other argument is a path (`None`).
pub fn inherited_fd(arg: &str) -> Option<Result<OwnedFd, String>> {
    let n = arg.strip_prefix("fd=")?;
    let Ok(fd) = n.parse::<RawFd>() else {
        return Some(Err(format!("{arg:?}: not a descriptor number")));
    };
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Some(Err(format!("{arg:?}: not an open descriptor")));
    }
    // SAFETY: init handed this descriptor to this process for this one use; nothing else in
    // the process refers to it.
    Some(Ok(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The L1 host side: serves one guest connection, accepted on a socket it listens on at
/// `path`, or (`fd=N`) the connected socketpair end init handed over, whose other end is the
/// jailed VMM's `--wl-socket-fd`.
pub fn peer(path: &str) -> Res {
    let conn = match inherited_fd(path) {
        Some(fd) => {
            println!("testprog: wl-peer serving the handed-over {path}");
            std::os::unix::net::UnixStream::from(fd?)
        }
        None => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path).map_err(e("bind"))?;
            println!("testprog: wl-peer listening on {path}");
            listener.accept().map_err(e("accept"))?.0
        }
    };
    let (data, fds) = recv_with_fds(conn.as_raw_fd())?;
    if data != b"hello from guest" || fds.len() != 3 {
        return Err(format!(
            "got {:?} with {} fds",
            String::from_utf8_lossy(&data),
            fds.len()
        ));
    }
    let mut fds = fds.into_iter();
    let (shm_fd, to_guest, from_guest) = match (fds.next(), fds.next(), fds.next()) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err("three fds expected".into()),
    };
    // A shared mapping of any fd: the guest library's type works on the host too.
    let mut shm_map = bulkhead_wl::SharedMemory::map(shm_fd, 8192).map_err(e("map guest shm"))?;
    let shm = shm_map.as_mut_slice();
    if cstr_at(shm, 0) != "guest-shm-data" {
        return Err(format!("guest shm holds {:?}", cstr_at(shm, 0)));
    }
    if !wait_for(shm, 100, "after-send") {
        return Err("the guest's write after sending is not visible (not zero copy)".into());
    }
    put_cstr(shm, 200, "host-was-here");
    let mut got = String::new();
    std::fs::File::from(from_guest)
        .read_to_string(&mut got)
        .map_err(e("read the guest's pipe"))?;
    if got != "guest-pipe-data" {
        return Err(format!("pipe from guest gave {got:?}"));
    }
    {
        let mut w = std::fs::File::from(to_guest);
        w.write_all(b"host-pipe-data")
            .map_err(e("write the guest's pipe"))?;
    }
    let memfd =
        nix::sys::memfd::memfd_create(c"host-memfd", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(e("memfd_create"))?;
    nix::unistd::ftruncate(&memfd, 4096).map_err(e("ftruncate"))?;
    let mut host_map = bulkhead_wl::SharedMemory::map(memfd.try_clone().map_err(e("dup"))?, 4096)
        .map_err(e("map our memfd"))?;
    let host_mem = host_map.as_mut_slice();
    put_cstr(host_mem, 0, "host-memfd");
    let raw = [memfd.as_fd().as_raw_fd()];
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(b"hello from host")],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(e("sendmsg"))?;
    if !wait_for(host_mem, 200, "guest-wrote-host-memfd") {
        return Err("the guest's write into our memfd is not visible".into());
    }
    let (done, _) = recv_with_fds(conn.as_raw_fd())?;
    if done != b"done" {
        return Err(format!(
            "expected done, got {:?}",
            String::from_utf8_lossy(&done)
        ));
    }
    Ok("wl-peer ok: data, shared memory both ways, memfd, pipes both ways".into())
}
