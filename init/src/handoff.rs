//! Descriptors init hands a child at exec: the hub's VM channels to the hub, a VMM's own
//! channel and its VFIO container and groups to that VMM. They arrive as fds 3, 4, … in
//! order, with arguments or environment variables that name them, so the child needs no
//! path on the host to find them.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use bulkhead_vfio::SysfsRoot;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// The first descriptor number a child receives.
pub const FIRST_FD: RawFd = 3;

/// What kind of child a recipe starts, and what it is owed at exec.
#[derive(Debug, Clone, Default)]
pub enum Role {
    /// A plain service: nothing beyond stdio.
    #[default]
    Plain,
    /// The hub: every VM's hub-side channel end, with `--vm NAME=FD` for each.
    Hub {
        /// (VM name, the hub's end), in service order.
        vms: Vec<(String, Arc<OwnedFd>)>,
    },
    /// A VMM.
    Vm {
        /// The VM's name in the policy.
        name: String,
        /// The VMM's end of its hub channel; `None` without a hub, or once the service has
        /// ended for good (so the hub sees the channel close).
        channel: Option<Arc<OwnedFd>>,
        /// IOMMU groups of the devices the policy grants this VM.
        vfio_groups: Vec<u32>,
    },
}

/// Where a descriptor from a service's `fds` comes from.
#[derive(Debug, Clone)]
pub enum FdSource {
    /// A path init opens at each start (as root, before the jail).
    Open {
        /// The path.
        path: std::path::PathBuf,
        /// Read-write (else read-only).
        write: bool,
    },
    /// One end of a socketpair init made when it read the system (kept across restarts).
    Shared(Arc<OwnedFd>),
}

/// One descriptor of a service's `fds`, and the argument that names it (`{fd}` replaced by
/// its number).
#[derive(Debug, Clone)]
pub struct ServiceFd {
    /// Where it comes from.
    pub source: FdSource,
    /// The argument template.
    pub arg: String,
}

/// The socketpairs a system's `fds` name: one per name, (first service's end, second's).
pub fn make_socketpairs(
    config: &crate::config::SystemConfig,
) -> BTreeMap<String, Vec<Arc<OwnedFd>>> {
    let mut out: BTreeMap<String, Vec<Arc<OwnedFd>>> = BTreeMap::new();
    for f in config.service.iter().flat_map(|s| s.fds.iter()) {
        let Some(name) = &f.socketpair else { continue };
        if out.contains_key(name) {
            continue;
        }
        let ty = match f.kind.as_deref() {
            Some("seqpacket") => SockType::SeqPacket,
            _ => SockType::Stream,
        };
        match socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC) {
            Ok((a, b)) => {
                out.insert(name.clone(), vec![Arc::new(a), Arc::new(b)]);
            }
            Err(e) => log::error!("cannot make socketpair {name}: {e}"),
        }
    }
    out
}

/// Opens `<dev>/kvm` read-write, close-on-exec (the handed-over copy loses close-on-exec
/// in [`install`]).
fn open_kvm(sys: &SysfsRoot) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(sys.dev().join("kvm"))?;
    Ok(OwnedFd::from(f))
}

/// The VM channels of a system: one SOCK_SEQPACKET socketpair per VM name, (hub end, VMM
/// end). A pair that cannot be made is logged and left out (that VM runs without a hub).
pub fn make_channels(vms: &[&str]) -> BTreeMap<String, (Arc<OwnedFd>, Arc<OwnedFd>)> {
    let mut out = BTreeMap::new();
    for vm in vms {
        match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok((hub, vmm)) => {
                out.insert(vm.to_string(), (Arc::new(hub), Arc::new(vmm)));
            }
            Err(e) => log::error!("cannot make the hub channel of vm {vm}: {e}"),
        }
    }
    out
}

/// The descriptors, arguments and environment one start of a child gets. The descriptors
/// are init's own (close-on-exec) copies, fresh for this start; they become fds 3, 4, … in
/// the child and are closed in init once the child has been spawned.
#[derive(Debug, Default)]
pub struct Handoff {
    /// In target order (the first becomes fd 3).
    pub fds: Vec<OwnedFd>,
    /// Appended to the program's arguments.
    pub args: Vec<String>,
    /// Added to the environment.
    pub env: Vec<(String, String)>,
    /// What was handed over, for the log (`hub channel`, `VFIO container`, …).
    pub what: Vec<String>,
}

impl Handoff {
    fn push(&mut self, fd: OwnedFd) -> RawFd {
        let n = FIRST_FD + self.fds.len() as RawFd;
        self.fds.push(fd);
        n
    }

    /// What `role` is owed for one start. VFIO nodes are opened here, afresh: a container
    /// or group left open by an earlier start would carry that start's DMA mappings.
    pub fn for_role(role: &Role, sys: &SysfsRoot) -> Result<Handoff, String> {
        let mut h = Handoff::default();
        match role {
            Role::Plain => {}
            Role::Hub { vms } => {
                for (name, end) in vms {
                    let fd = end
                        .try_clone()
                        .map_err(|e| format!("hub channel of {name}: {e}"))?;
                    let n = h.push(fd);
                    h.args.push("--vm".to_string());
                    h.args.push(format!("{name}={n}"));
                    h.what.push(format!("channel of {name} as fd {n}"));
                }
            }
            Role::Vm {
                name,
                channel,
                vfio_groups,
            } => {
                h.env.push(("BULKHEAD_VM".to_string(), name.clone()));
                if let Some(end) = channel {
                    let fd = end
                        .try_clone()
                        .map_err(|e| format!("hub channel of {name}: {e}"))?;
                    let n = h.push(fd);
                    h.env.push(("BULKHEAD_HUB_FD".to_string(), n.to_string()));
                    h.what.push(format!("hub channel as fd {n}"));
                }
                if !vfio_groups.is_empty() {
                    let container = bulkhead_vfio::open_container_fd(sys)
                        .map_err(|e| format!("VFIO container for {name}: {e}"))?;
                    let n = h.push(container);
                    h.env
                        .push(("BULKHEAD_VFIO_CONTAINER_FD".to_string(), n.to_string()));
                    h.what.push(format!("VFIO container as fd {n}"));
                    let mut groups = Vec::new();
                    let ids: Vec<String> = vfio_groups.iter().map(u32::to_string).collect();
                    h.env
                        .push(("BULKHEAD_VFIO_GROUP_IDS".to_string(), ids.join(",")));
                    for g in vfio_groups {
                        let fd = bulkhead_vfio::open_group_fd(sys, *g)
                            .map_err(|e| format!("IOMMU group {g} for {name}: {e}"))?;
                        let n = h.push(fd);
                        h.what.push(format!("IOMMU group {g} as fd {n}"));
                        groups.push(n.to_string());
                    }
                    h.env
                        .push(("BULKHEAD_VFIO_GROUP_FDS".to_string(), groups.join(",")));
                }
                // /dev/kvm as a descriptor too (last, so the others keep their numbers): a
                // VMM running as its own user needs no path.
                let kvm = open_kvm(sys).map_err(|e| format!("/dev/kvm for {name}: {e}"))?;
                let n = h.push(kvm);
                h.env.push(("BULKHEAD_KVM_FD".to_string(), n.to_string()));
                h.what.push(format!("/dev/kvm as fd {n}"));
            }
        }
        Ok(h)
    }

    /// Appends a service's own `fds` (after what its role is owed), each with its argument.
    pub fn add_service_fds(&mut self, fds: &[ServiceFd]) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        for f in fds {
            let fd = match &f.source {
                FdSource::Open { path, write } => std::fs::OpenOptions::new()
                    .read(true)
                    .write(*write)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(path)
                    .map(OwnedFd::from)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
                FdSource::Shared(end) => end
                    .try_clone()
                    .map_err(|e| format!("socketpair end: {e}"))?,
            };
            let what = match &f.source {
                FdSource::Open { path, write } => {
                    format!("{} ({})", path.display(), if *write { "rw" } else { "ro" })
                }
                FdSource::Shared(_) => "a socketpair end".to_string(),
            };
            let n = self.push(fd);
            self.args.push(f.arg.replace("{fd}", &n.to_string()));
            self.what.push(format!("{what} as fd {n}"));
        }
        Ok(())
    }

    /// The raw numbers of the descriptors, in target order (for [`install`]).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.fds.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// In the child, between fork and exec: makes `fds[i]` descriptor `FIRST_FD + i`, without
/// close-on-exec. Each source is first duplicated above every target, so a source that
/// happens to sit on a target number is not overwritten before it is moved. `scratch` must
/// have the length of `fds` (no allocation happens here).
pub fn install(fds: &[RawFd], scratch: &mut [RawFd]) -> std::io::Result<()> {
    let above = FIRST_FD + fds.len() as RawFd;
    for (src, tmp) in fds.iter().zip(scratch.iter_mut()) {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor number is async-signal-safe and
        // touches no memory.
        let r = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, above) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        *tmp = r;
    }
    for (i, tmp) in scratch.iter().enumerate() {
        let target = FIRST_FD + i as RawFd;
        // SAFETY: dup2 is async-signal-safe; the new descriptor does not have close-on-exec.
        if unsafe { libc::dup2(*tmp, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
