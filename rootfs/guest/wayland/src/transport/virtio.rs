//! The real transport: `/dev/wl0` through `bulkhead-wl`.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use bulkhead_wl::{Listener, Wl, WlError, WlPipe, WlStream};

use super::{Acceptor, Channel, Mapping, PipeFromPeer, Transport};

fn io(e: WlError) -> std::io::Error {
    match e {
        WlError::Io { err, .. } => err,
        other => std::io::Error::other(other.to_string()),
    }
}

/// The virtio_wl device.
#[derive(Clone, Copy)]
pub struct Virtio {
    wl: &'static Wl,
}

impl Virtio {
    /// Opens the device node (`/dev/wl0`). The device stays open for the life of the process (a proxy opens
    /// it once), which lets connections and the listener share it without lifetimes.
    pub fn open(device: &std::path::Path) -> std::io::Result<Self> {
        let wl = Wl::open_path(device).map_err(io)?;
        Ok(Self {
            wl: Box::leak(Box::new(wl)),
        })
    }

    /// Provides `service` (the listener context `listen:<service>`): the faux accept.
    pub fn listen(&self, service: &str) -> std::io::Result<VirtioAcceptor> {
        Ok(VirtioAcceptor(
            Listener::bind(self.wl, &format!("listen:{service}")).map_err(io)?,
        ))
    }
}

struct Stream(WlStream);

impl Channel for Stream {
    fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        self.0.send(data, fds).map_err(io)
    }
    fn recv(&self) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.0.recv().map_err(io)
    }
    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.0.fd()
    }
}

struct PipeReader(WlPipe);

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.0).read(buf)
    }
}

struct PipeWriter(WlPipe);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Transport for Virtio {
    fn connect(&self, name: &str) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(Stream(self.wl.connect(name).map_err(io)?)))
    }

    fn alloc(&self, size: usize) -> std::io::Result<(OwnedFd, Mapping)> {
        let shm = self.wl.alloc(size).map_err(io)?;
        let fd = shm.fd().try_clone_to_owned()?;
        drop(shm);
        let map = Mapping::new_backed(fd.as_fd(), size, true)?;
        Ok((fd, map))
    }

    fn pipe_from_peer(&self) -> std::io::Result<PipeFromPeer> {
        let pipe = self.wl.pipe_read().map_err(io)?;
        // Sending the pipe vfd gives the peer its write end; the same vfd is read here.
        let remote = pipe.fd().try_clone_to_owned()?;
        Ok(PipeFromPeer {
            local: Box::new(PipeReader(pipe)),
            remote,
        })
    }

    fn received_pipe_writer(&self, fd: OwnedFd) -> Box<dyn Write + Send> {
        Box::new(PipeWriter(WlPipe::from(fd)))
    }

    fn map_received(&self, fd: BorrowedFd<'_>, len: usize) -> std::io::Result<Mapping> {
        // The driver refuses a mapping past the vfd's size, so all of it is backed.
        Mapping::new_backed(fd, len, false)
    }

    fn is_vfd(&self, fd: BorrowedFd<'_>) -> bool {
        is_virtwl_vfd(fd)
    }
}

/// Whether `fd` is a virtio_wl vfd (the driver's anon inode `[virtwl_vfd]`).
pub fn is_virtwl_vfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[virtwl_vfd]")
        .unwrap_or(false)
}

/// The faux accept over a listener context (`bulkhead_wl::Listener`).
pub struct VirtioAcceptor(Listener<'static>);

impl Acceptor for VirtioAcceptor {
    fn accept(&mut self) -> std::io::Result<(Box<dyn Channel>, String)> {
        loop {
            match self.0.accept() {
                Ok((s, name)) => return Ok((Box::new(Stream(s)), name)),
                // A name that could not be connected (the hub dropped that connection
                // before it was taken): that client is gone; the next one may come.
                Err(WlError::Io {
                    what: "VIRTWL_IOCTL_NEW",
                    err,
                }) => log::warn!("a connection could not be taken: {err}"),
                Err(e) => return Err(io(e)),
            }
        }
    }
}
