//! The control socket: `status`, `shutdown` (press the ACPI power button; the guest shuts
//! itself down) and `kill` (stop now), as postcard frames over SOCK_SEQPACKET
//! (`bulkhead_ipc::Channel`).
//!
//! The server runs on its own thread and never blocks on the VM: a request only reads shared
//! state or posts an event (an eventfd write), so nothing waits while holding a lock. Clients
//! come from a listening socket (`--control-socket PATH`) and/or one already-connected socket
//! (`--control-fd N`). Each request gets exactly one response on the same channel.
//!
//! Wire format (postcard enum indices, after the frame's version byte):
//! `ControlRequest::{Status=0, Shutdown=1, Kill=2, WlAdd=3}`,
//! `ControlResponse::{Status(VmStatus)=0, Done=1, Error(String)=2, WlAdded(String)=3}`.
//!
//! `WlAdd { name, path }` adds a virtio_wl socket while the VM runs: with one fd attached
//! (SCM_RIGHTS) it is a non-listening socket (an accepted connection, consumed by one
//! connect; it must be a stream socket, anything else is refused with an `Error`),
//! otherwise `path` names a listening socket. `name` may be a pattern with one `%d`
//! (`wl-conn-%d`); the answer is `WlAdded(chosen name)`. It only touches the socket registry,
//! never the device, so it is answered even before the guest activates the device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bulkhead_ipc::channel::{Channel, ChannelError, ChannelListener};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::acpi::ged::PowerButton;
use crate::vstate::exit::{ExitReason, ExitSignal};

/// Most control clients connected at once; more are refused (closed at once).
pub const MAX_CLIENTS: usize = 16;

/// A request from a control client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// How is the VM?
    Status,
    /// Press the ACPI power button; the guest decides to power off.
    Shutdown,
    /// Stop the VM at once (exit status 4).
    Kill,
    /// Add a virtio_wl socket (see the module documentation).
    WlAdd {
        /// A name, or a pattern with one `%d`.
        name: String,
        /// A listening socket's path, when no fd is attached.
        path: Option<std::path::PathBuf>,
    },
}

/// What the VM is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// False once a stop reason is recorded.
    pub running: bool,
    /// The stop reason, if any (`Poweroff`, `Reboot`, `Killed`, `GuestCrash: ...`).
    pub exit_reason: Option<String>,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Devices on the PCI bus, by name.
    pub devices: Vec<String>,
    /// How many times the power button was pressed.
    pub power_button_presses: u32,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// For `Status`.
    Status(VmStatus),
    /// The request was carried out (for `Shutdown`: the button was pressed).
    Done,
    /// The request failed.
    Error(String),
    /// For `WlAdd`: the name chosen.
    WlAdded(String),
}

/// What the control server may touch: shared, lock-free or short-lock state only.
pub struct ControlTarget {
    /// The VM's stop signal.
    pub exit: Arc<ExitSignal>,
    /// The power button.
    pub power_button: Arc<PowerButton>,
    /// Static facts for `Status`.
    pub vcpus: u8,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// PCI device names.
    pub devices: Vec<String>,
    presses: AtomicU32,
    wl_sockets: std::sync::OnceLock<crate::devices::virtio::wl::sockets::WlSockets>,
}

impl ControlTarget {
    /// A target over the given VM parts.
    pub fn new(
        exit: Arc<ExitSignal>,
        power_button: Arc<PowerButton>,
        vcpus: u8,
        memory_bytes: u64,
        devices: Vec<String>,
    ) -> Self {
        Self {
            exit,
            power_button,
            vcpus,
            memory_bytes,
            devices,
            presses: AtomicU32::new(0),
            wl_sockets: std::sync::OnceLock::new(),
        }
    }

    /// Gives `WlAdd` the VM's virtio_wl socket registry (once; later calls are ignored).
    pub fn set_wl_sockets(&self, sockets: crate::devices::virtio::wl::sockets::WlSockets) {
        let _ = self.wl_sockets.set(sockets);
    }

    /// Carries out one request.
    pub fn handle(&self, req: &ControlRequest) -> ControlResponse {
        self.handle_with_fds(req, Vec::new())
    }

    /// Carries out one request that came with `fds` (owned: any not used are closed).
    pub fn handle_with_fds(
        &self,
        req: &ControlRequest,
        mut fds: Vec<std::os::fd::OwnedFd>,
    ) -> ControlResponse {
        match req {
            ControlRequest::WlAdd { name, path } => {
                use crate::devices::virtio::wl::sockets::WlSocket;
                let Some(sockets) = self.wl_sockets.get() else {
                    return ControlResponse::Error("this VM has no virtio_wl device".into());
                };
                let socket = match (fds.pop(), path) {
                    (Some(fd), _) if fds.is_empty() => match check_stream_socket(&fd) {
                        Ok(()) => WlSocket::NonListening(std::os::unix::net::UnixStream::from(fd)),
                        Err(e) => {
                            log::warn!("bulkhead-vmm: wl add refused: {e}");
                            return ControlResponse::Error(format!("wl add: {e}"));
                        }
                    },
                    (Some(_), _) => {
                        return ControlResponse::Error("wl add takes at most one fd".into())
                    }
                    (None, Some(p)) => WlSocket::Listening(p.clone()),
                    (None, None) => {
                        return ControlResponse::Error("wl add needs an fd or a path".into())
                    }
                };
                match sockets.add(name, socket) {
                    Ok(chosen) => ControlResponse::WlAdded(chosen),
                    Err(e) => ControlResponse::Error(e.to_string()),
                }
            }
            ControlRequest::Status => {
                let reason = self.exit.reason();
                ControlResponse::Status(VmStatus {
                    running: reason.is_none(),
                    exit_reason: reason.map(|r| format!("{r:?}")),
                    vcpus: self.vcpus,
                    memory_bytes: self.memory_bytes,
                    devices: self.devices.clone(),
                    power_button_presses: self.presses.load(Ordering::Relaxed),
                })
            }
            ControlRequest::Shutdown => match self.power_button.press() {
                Ok(()) => {
                    self.presses.fetch_add(1, Ordering::Relaxed);
                    ControlResponse::Done
                }
                Err(e) => ControlResponse::Error(format!("power button: {e}")),
            },
            ControlRequest::Kill => {
                self.exit.request(ExitReason::Killed);
                ControlResponse::Done
            }
        }
    }
}

/// Why `wl add` refused the fd it was given.
#[derive(Debug, thiserror::Error)]
pub enum WlAddFdError {
    /// fstat(2) or getsockopt(2) failed.
    #[error("cannot inspect the fd: {0}")]
    Inspect(std::io::Error),
    /// Not a socket at all.
    #[error("the fd is not a socket (it is a {0}); wl add takes a connected stream socket")]
    NotASocket(&'static str),
    /// A socket, but not SOCK_STREAM.
    #[error(
        "the fd is a socket of type {0}, not SOCK_STREAM; wl add takes a connected stream socket"
    )]
    NotAStream(i32),
}

/// Checks that `fd` is a stream socket (`S_IFSOCK` by fstat, then `SO_TYPE`): the device
/// uses it as a `UnixStream` (recvmsg/sendmsg of a byte stream with SCM_RIGHTS).
pub fn check_stream_socket(fd: &impl AsRawFd) -> Result<(), WlAddFdError> {
    let raw = fd.as_raw_fd();
    // SAFETY: an all-zero stat is valid; fstat fills it from an open fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(raw, &mut st) } != 0 {
        return Err(WlAddFdError::Inspect(std::io::Error::last_os_error()));
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => None,
        libc::S_IFREG => Some("regular file"),
        libc::S_IFIFO => Some("pipe"),
        libc::S_IFCHR => Some("character device"),
        libc::S_IFBLK => Some("block device"),
        libc::S_IFDIR => Some("directory"),
        _ => Some("file of another type"),
    };
    if let Some(k) = kind {
        return Err(WlAddFdError::NotASocket(k));
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_TYPE writes one c_int into `ty`; `len` says how much room there is.
    let r = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::addr_of_mut!(ty).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(WlAddFdError::Inspect(std::io::Error::last_os_error()));
    }
    if ty != libc::SOCK_STREAM {
        return Err(WlAddFdError::NotAStream(ty));
    }
    Ok(())
}

/// The running server; dropping it stops the thread.
pub struct ControlServer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    path: Option<std::path::PathBuf>,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error("control socket {path}: {err}")]
    Bind {
        /// The path.
        path: String,
        /// Why.
        err: ChannelError,
    },
    /// Thread or eventfd failure.
    #[error("control server: {0}")]
    Io(#[from] std::io::Error),
}

impl ControlServer {
    /// Serves `target` on a socket bound at `path` (mode 0600) and/or on `connected`.
    pub fn start(
        target: Arc<ControlTarget>,
        path: Option<&Path>,
        connected: Option<Channel>,
    ) -> Result<Self, ControlError> {
        let listener = match path {
            Some(p) => Some(
                ChannelListener::bind(p, 0o600).map_err(|err| ControlError::Bind {
                    path: p.display().to_string(),
                    err,
                })?,
            ),
            None => None,
        };
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_thread = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Control);
                serve(&target, listener, connected, &stop_thread)
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            path: path.map(Path::to_path_buf),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
        // The socket file we bound is ours to remove.
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn pollfd(fd: BorrowedFd<'_>) -> libc::pollfd {
    raw_pollfd(fd.as_raw_fd())
}

fn raw_pollfd(fd: std::os::fd::RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn serve(
    target: &ControlTarget,
    listener: Option<ChannelListener>,
    connected: Option<Channel>,
    stop: &EventFd,
) {
    let mut clients: Vec<Channel> = connected.into_iter().collect();
    loop {
        // Order: stop, listener (if any), then clients.
        let mut fds = vec![raw_pollfd(stop.as_raw_fd())];
        if let Some(l) = &listener {
            fds.push(pollfd(l.as_fd()));
        }
        let first_client = fds.len();
        fds.extend(clients.iter().map(|c| pollfd(c.as_fd())));
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("bulkhead-vmm: control poll failed");
            return;
        }
        if fds.first().is_some_and(|p| p.revents != 0) {
            return;
        }
        let mut dead = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let Some(p) = fds.get(first_client + i) else {
                continue;
            };
            if p.revents == 0 {
                continue;
            }
            match c.try_recv::<ControlRequest>() {
                Ok((req, fds)) => {
                    log::info!("bulkhead-vmm: control request {req:?}");
                    let resp = target.handle_with_fds(&req, fds);
                    if let Err(e) = c.try_send(&resp, &[]) {
                        log::warn!("bulkhead-vmm: control reply dropped: {e}");
                    }
                }
                Err(ChannelError::WouldBlock) => {}
                Err(ChannelError::Closed) => dead.push(i),
                Err(
                    e @ (ChannelError::Frame(_)
                    | ChannelError::EmptyFrame { .. }
                    | ChannelError::Truncated { .. }),
                ) => {
                    let _ = c.try_send(&ControlResponse::Error(format!("bad request: {e}")), &[]);
                }
                Err(e) => {
                    log::warn!("bulkhead-vmm: control client dropped: {e}");
                    dead.push(i);
                }
            }
            if p.revents & (libc::POLLHUP | libc::POLLERR) != 0 && !dead.contains(&i) {
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            if i < clients.len() {
                clients.remove(i);
            }
        }
        if let (Some(l), Some(p)) = (&listener, fds.get(1)) {
            if p.revents != 0 {
                match l.accept() {
                    Ok(c) if clients.len() < MAX_CLIENTS => clients.push(c),
                    Ok(_) => log::warn!("bulkhead-vmm: too many control clients; refused"),
                    Err(ChannelError::WouldBlock) => {}
                    Err(e) => log::warn!("bulkhead-vmm: control accept: {e}"),
                }
            }
        }
    }
}
