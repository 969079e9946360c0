//! The command line → `VmConfig`: what to boot and where every file comes from (a path, or a
//! file descriptor the parent already opened, so the VMM needs no filesystem access).

use std::fs::{File, OpenOptions};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use clap::Parser;

use crate::devices::virtio::wl::state::WlLimits;

const AFTER_HELP: &str = "\
Exit status:
  0  the guest powered off (ACPI S5)
  1  VMM error (bad configuration, KVM failure, missing file)
  2  bad command line
  3  the guest rebooted (ACPI reset register, 8042 reset or triple fault); the VMM does not
     restart it, its supervisor may
  4  killed through the control socket
  5  the guest crashed KVM (internal error or failed VM entry)

Log lines on stderr start with `bulkhead-vmm:`. RUST_LOG or --log-level set the verbosity.";

/// Command-line interface of `bulkhead-vmm`.
#[derive(Debug, Parser)]
#[command(name = "bulkhead-vmm", version, about = "Runs one KVM virtual machine: boots a Linux bzImage with ACPI, COM1, and virtio-pci devices.", after_help = AFTER_HELP)]
pub struct Cli {
    /// Kernel bzImage.
    #[arg(
        long,
        conflicts_with = "kernel_fd",
        required_unless_present = "kernel_fd"
    )]
    pub kernel: Option<PathBuf>,
    /// Kernel bzImage as an already-open file descriptor.
    #[arg(long)]
    pub kernel_fd: Option<RawFd>,
    /// Initramfs (newc cpio, optionally compressed).
    #[arg(long, conflicts_with = "initramfs_fd")]
    pub initramfs: Option<PathBuf>,
    /// Initramfs as an already-open file descriptor.
    #[arg(long)]
    pub initramfs_fd: Option<RawFd>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 panic=-1")]
    pub cmdline: String,
    /// Guest RAM, e.g. 256M, 1G, or bytes.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Where COM1 output goes: `stdout`, `none`, or a file path (created/truncated).
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// COM1 output to an already-open file descriptor (overrides --serial).
    #[arg(long)]
    pub serial_fd: Option<RawFd>,
    /// Feed stdin to COM1 (guest console input).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub serial_input: bool,
    /// A raw disk image for a virtio-blk device (repeatable; the first is /dev/vda).
    #[arg(long)]
    pub disk: Vec<PathBuf>,
    /// A raw disk image as an already-open file descriptor (repeatable; after --disk ones).
    #[arg(long)]
    pub disk_fd: Vec<RawFd>,
    /// Make every disk read-only.
    #[arg(long)]
    pub disk_read_only: bool,
    /// Add a virtio-rng device (the guest's /dev/hwrng).
    #[arg(long)]
    pub rng: bool,
    /// Add a virtio_wl device (the guest's /dev/wl0), even without --wl-socket.
    #[arg(long)]
    pub wl: bool,
    /// A virtio_wl socket NAME=PATH: the guest's NEW_CTX_NAMED NAME connects to the listening
    /// socket at PATH (a bare PATH is the unnamed socket NEW_CTX uses). Repeatable; implies
    /// --wl. More are added at run time with the control socket's `wl add`.
    #[arg(long, value_parser = parse_wl_socket)]
    pub wl_socket: Vec<(String, PathBuf)>,
    /// A virtio_wl socket NAME=FD: an inherited, already-connected stream socket (one end of
    /// a socketpair init made for this VMM and a host service): the guest's first
    /// NEW_CTX_NAMED NAME gets it; later ones find no such name. For a jailed VMM, which
    /// cannot reach a host path. Repeatable; implies --wl.
    #[arg(long, value_parser = parse_wl_socket_fd)]
    pub wl_socket_fd: Vec<(String, RawFd)>,
    /// virtio_wl: most vfds alive at once, guest and host ids together (default 1024). A
    /// guest request over it gets ENOMEM; an fd a host socket sends over it is dropped.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub wl_max_vfds: Option<u32>,
    /// virtio_wl: most shared memory mapped into the guest at once, e.g. 64M, 64MiB, 1G, or
    /// bytes (default 1G).
    #[arg(long, value_parser = parse_wl_size)]
    pub wl_max_shm_bytes: Option<u64>,
    /// virtio_wl: most shared-memory vfds at once; each costs one KVM memory slot
    /// (default 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub wl_max_shm_count: Option<u32>,
    /// The VM channel to the hub: an inherited SOCK_SEQPACKET socket (init passes fd 3 and
    /// sets BULKHEAD_HUB_FD). virtio_wl names not in the local registry are resolved through
    /// it: `listen:SVC` provides SVC, `SVC` / `SVC@VM` connect. Implies --wl.
    #[arg(long, env = "BULKHEAD_HUB_FD")]
    pub hub_fd: Option<RawFd>,
    /// A virtio-net device whose backend is the hub service SERVICE@VM (the net VM's
    /// `net@net-vm`): the VMM connects at start through the hub channel (--hub-fd) and again
    /// whenever the connection closes; the guest sees the link up only while it is
    /// connected. Needs --net-mac.
    #[arg(long, value_parser = parse_net_service, requires_all = ["net_mac", "hub_fd"])]
    pub net: Option<String>,
    /// The virtio-net device's MAC address (52:54:00:12:34:56).
    #[arg(long, value_parser = crate::devices::virtio::net::device::parse_mac, requires = "net")]
    pub net_mac: Option<[u8; 6]>,
    /// Pass a host PCI function through (bound to vfio-pci), e.g. 0000:00:03.0. Repeatable.
    #[arg(long)]
    pub vfio: Vec<String>,
    /// /dev/vfio/vfio as an already-open descriptor (with --vfio-group-fd: no host paths).
    #[arg(long, requires = "vfio", env = "BULKHEAD_VFIO_CONTAINER_FD")]
    pub vfio_container_fd: Option<RawFd>,
    /// An IOMMU group (/dev/vfio/<n>) as an already-open descriptor. Repeatable.
    #[arg(
        long,
        requires = "vfio_container_fd",
        env = "BULKHEAD_VFIO_GROUP_FDS",
        value_delimiter = ','
    )]
    pub vfio_group_fd: Vec<RawFd>,
    /// /dev/kvm as an already-open file descriptor (init hands it over and sets
    /// BULKHEAD_KVM_FD, so a VMM running as its own user needs no path).
    #[arg(long, env = "BULKHEAD_KVM_FD")]
    pub kvm_fd: Option<RawFd>,
    /// Listen for control clients on this Unix socket path.
    #[arg(long, conflicts_with = "control_fd")]
    pub control_socket: Option<PathBuf>,
    /// A control connection (a connected socket) already open as this file descriptor.
    #[arg(long)]
    pub control_fd: Option<RawFd>,
    /// seccomp filters (one per thread kind): `kill` the process on a call outside its list
    /// (default), or `log` it and let it through (development; the kernel logs
    /// `type=1326 … syscall=N`).
    #[arg(long, default_value = "kill", value_parser = parse_seccomp)]
    pub seccomp: bulkhead_ipc::seccomp::SeccompMode,
    /// Test only: instead of running the VM, make one escape attempt from a thread under
    /// the vCPU filter (open-host-file, socket-inet, ptrace, mount, ofd-unlock, fork,
    /// memory) and report it; the jail and the filter should stop each.
    #[arg(long, hide = true)]
    pub test_escape: Option<String>,
    /// Fault injection, tests only: the virtio_wl device drops its first N queue
    /// interrupts (the buffers are used, the guest is not told), as a lost interrupt under
    /// nested emulation does; the guest driver's sweep must find them.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_drop_wl_interrupts: u32,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

fn parse_net_service(s: &str) -> Result<String, String> {
    crate::devices::virtio::net::hub::check_service(s)?;
    Ok(s.to_string())
}

fn parse_seccomp(s: &str) -> Result<bulkhead_ipc::seccomp::SeccompMode, String> {
    s.parse()
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("bad log level {s:?}"))
}

/// Parses `256M`, `1G`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?} (use e.g. 256M or 1G)"))
}

/// Parses a `--wl-max-shm-bytes` size: what [`parse_size`] takes, and also `64MiB`,
/// `64MB`, `4KiB`, `1GiB` (all powers of two).
pub fn parse_wl_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .filter(|n| n.ends_with(['K', 'k', 'M', 'm', 'G', 'g']))
        .unwrap_or(t);
    parse_size(t).map_err(|_| format!("bad size {s:?} (use e.g. 64MiB, 64M, 1G or bytes)"))
}

/// Errors resolving the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A path could not be opened.
    #[error("cannot open {path}: {err}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// An fd number is not an open descriptor, or is used twice.
    #[error("file descriptor {0} is not open or is given twice")]
    BadFd(RawFd),
}

/// Where a file comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Open this path.
    Path(PathBuf),
    /// Take ownership of this inherited descriptor.
    Fd(RawFd),
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel.
    pub kernel: Source,
    /// Initramfs.
    pub initramfs: Option<Source>,
    /// Command line.
    pub cmdline: String,
    /// RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Serial output: None = discard, Some(None) = stdout, Some(Some(src)) = file.
    pub serial_out: Option<Option<Source>>,
    /// Read stdin into COM1.
    pub serial_input: bool,
    /// Disks.
    pub disks: Vec<Source>,
    /// Disks read-only.
    pub disk_read_only: bool,
    /// virtio-rng.
    pub rng: bool,
    /// virtio_wl device.
    pub wl: bool,
    /// virtio_wl sockets at start (name, listening path).
    pub wl_sockets: Vec<(String, PathBuf)>,
    /// virtio_wl sockets at start (name, inherited connected stream).
    pub wl_socket_fds: Vec<(String, RawFd)>,
    /// virtio_wl per-VM limits (`--wl-max-*`; defaults where not given).
    pub wl_limits: WlLimits,
    /// The hub's VM channel (inherited descriptor).
    pub hub_fd: Option<RawFd>,
    /// virtio-net: its backend service (`net@net-vm`) and MAC.
    pub net: Option<(String, [u8; 6])>,
    /// PCI functions to pass through (`--vfio`).
    pub vfio: Vec<String>,
    /// The VFIO container as an inherited descriptor.
    pub vfio_container_fd: Option<RawFd>,
    /// IOMMU groups as inherited descriptors.
    pub vfio_group_fds: Vec<RawFd>,
    /// /dev/kvm.
    pub kvm_fd: Option<RawFd>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Control connection fd.
    pub control_fd: Option<RawFd>,
    /// seccomp mode.
    pub seccomp: bulkhead_ipc::seccomp::SeccompMode,
    /// Test only: an escape attempt instead of the VM.
    pub test_escape: Option<String>,
    /// Test only: virtio_wl interrupts to drop (fault injection).
    pub test_drop_wl_interrupts: u32,
}

impl From<Cli> for VmConfig {
    fn from(c: Cli) -> Self {
        let kernel = match (c.kernel, c.kernel_fd) {
            (Some(p), _) => Source::Path(p),
            (None, Some(fd)) => Source::Fd(fd),
            (None, None) => Source::Path(PathBuf::new()),
        };
        let initramfs = c
            .initramfs
            .map(Source::Path)
            .or(c.initramfs_fd.map(Source::Fd));
        let serial_out = match (c.serial_fd, c.serial.as_str()) {
            (Some(fd), _) => Some(Some(Source::Fd(fd))),
            (None, "none") => None,
            (None, "stdout") => Some(None),
            (None, path) => Some(Some(Source::Path(PathBuf::from(path)))),
        };
        let mut disks: Vec<Source> = c.disk.into_iter().map(Source::Path).collect();
        disks.extend(c.disk_fd.into_iter().map(Source::Fd));
        let mut wl_limits = WlLimits::default();
        if let Some(n) = c.wl_max_vfds {
            wl_limits.max_vfds = n as usize;
        }
        if let Some(n) = c.wl_max_shm_bytes {
            wl_limits.max_shm_bytes = n;
        }
        if let Some(n) = c.wl_max_shm_count {
            wl_limits.max_shm_count = n as usize;
        }
        VmConfig {
            kernel,
            initramfs,
            cmdline: c.cmdline,
            memory: c.memory,
            vcpus: c.vcpus,
            serial_out,
            serial_input: c.serial_input,
            disks,
            disk_read_only: c.disk_read_only,
            rng: c.rng,
            wl: c.wl || !c.wl_socket.is_empty() || !c.wl_socket_fd.is_empty() || c.hub_fd.is_some(),
            wl_sockets: c.wl_socket,
            wl_socket_fds: c.wl_socket_fd,
            wl_limits,
            hub_fd: c.hub_fd,
            net: c.net.zip(c.net_mac),
            vfio: c.vfio,
            vfio_container_fd: c.vfio_container_fd,
            vfio_group_fds: c.vfio_group_fd,
            kvm_fd: c.kvm_fd,
            control_socket: c.control_socket,
            control_fd: c.control_fd,
            seccomp: c.seccomp,
            test_escape: c.test_escape,
            test_drop_wl_interrupts: c.test_drop_wl_interrupts,
        }
    }
}

/// Parses `--wl-socket NAME=PATH` (split at the first `=`; no `=`: the unnamed socket).
pub fn parse_wl_socket(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s.split_once('=').unwrap_or(("", s));
    if name.len() > 32 || name.contains('%') {
        return Err(format!(
            "bad wl socket name {name:?} (at most 32 bytes, no %)"
        ));
    }
    if path.is_empty() {
        return Err("empty wl socket path".into());
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Parses `--wl-socket-fd NAME=FD`.
pub fn parse_wl_socket_fd(s: &str) -> Result<(String, RawFd), String> {
    let Some((name, fd)) = s.split_once('=') else {
        return Err(format!("{s:?}: expected NAME=FD"));
    };
    if name.is_empty() || name.len() > 32 || name.contains('%') || name.contains('\0') {
        return Err(format!(
            "bad wl socket name {name:?} (1 to 32 bytes, no % or NUL)"
        ));
    }
    let fd: RawFd = fd
        .parse()
        .map_err(|_| format!("{fd:?}: not a descriptor number"))?;
    Ok((name.to_string(), fd))
}

/// Takes ownership of inherited descriptors, each at most once.
#[derive(Default)]
pub struct FdTaker {
    taken: Vec<RawFd>,
}

impl FdTaker {
    /// Owns `fd` after checking it is open and not yet taken.
    pub fn take(&mut self, fd: RawFd) -> Result<OwnedFd, ConfigError> {
        // SAFETY: F_GETFD only inspects the descriptor table.
        let open = fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        if !open || self.taken.contains(&fd) || (0..=2).contains(&fd) {
            return Err(ConfigError::BadFd(fd));
        }
        self.taken.push(fd);
        // Keep it from leaking into anything we might exec.
        // SAFETY: fd is open (checked above); FD_CLOEXEC changes only its flags.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the parent passed this descriptor for us to own; it is open, not stdio, and
        // taken once (the list above), so no other owner exists in this process.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens `src` for reading (and writing if `write`).
    pub fn open(&mut self, src: &Source, write: bool) -> Result<File, ConfigError> {
        match src {
            Source::Fd(fd) => Ok(File::from(self.take(*fd)?)),
            Source::Path(p) => OpenOptions::new()
                .read(true)
                .write(write)
                .open(p)
                .map_err(|err| ConfigError::Open {
                    path: p.clone(),
                    err,
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn wl_socket_fds_parse_and_imply_wl() {
        assert_eq!(parse_wl_socket_fd("peer=5"), Ok(("peer".to_string(), 5)));
        assert!(parse_wl_socket_fd("peer").is_err());
        assert!(parse_wl_socket_fd("=5").is_err());
        assert!(parse_wl_socket_fd("wl-conn-%d=5").is_err());
        assert!(parse_wl_socket_fd("peer=x").is_err());
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "/k",
            "--wl-socket-fd",
            "peer=5",
            "--wl-socket-fd",
            "listen=6",
        ]);
        let cfg = VmConfig::from(c.unwrap_or_else(|e| panic!("{e}")));
        assert!(cfg.wl);
        assert_eq!(
            cfg.wl_socket_fds,
            vec![("peer".to_string(), 5), ("listen".to_string(), 6)]
        );
    }

    #[test]
    fn cli_maps_to_config() {
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel-fd",
            "7",
            "--disk",
            "/a.img",
            "--disk-fd",
            "9",
            "--serial",
            "none",
            "--vcpus",
            "2",
            "--rng",
        ])
        .unwrap();
        let v = VmConfig::from(c);
        assert!(matches!(v.kernel, Source::Fd(7)));
        assert_eq!(v.disks.len(), 2);
        assert!(v.serial_out.is_none());
        assert_eq!(v.vcpus, 2);
        assert!(v.rng);
        assert!(
            Cli::try_parse_from(["bulkhead-vmm"]).is_err(),
            "a kernel is required"
        );
        assert!(
            Cli::try_parse_from(["bulkhead-vmm", "--kernel", "k", "--memory", "lots"]).is_err()
        );
    }

    #[test]
    fn wl_limits_default_and_set() {
        let c = Cli::try_parse_from(["bulkhead-vmm", "--kernel", "k", "--wl"]).unwrap();
        assert_eq!(VmConfig::from(c).wl_limits, WlLimits::default());
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--wl",
            "--wl-max-vfds",
            "64",
            "--wl-max-shm-bytes",
            "64MiB",
            "--wl-max-shm-count",
            "8",
        ])
        .unwrap();
        let l = VmConfig::from(c).wl_limits;
        assert_eq!(
            l,
            WlLimits {
                max_vfds: 64,
                max_shm_bytes: 64 << 20,
                max_shm_count: 8
            }
        );
        // Only the one given changes.
        let c = Cli::try_parse_from([
            "bulkhead-vmm",
            "--kernel",
            "k",
            "--wl-max-shm-bytes",
            "4096",
        ])
        .unwrap();
        let l = VmConfig::from(c).wl_limits;
        assert_eq!(l.max_shm_bytes, 4096);
        assert_eq!(l.max_vfds, WlLimits::default().max_vfds);
        for bad in [
            ["--wl-max-vfds", "0"],
            ["--wl-max-vfds", "-1"],
            ["--wl-max-shm-count", "0"],
            ["--wl-max-shm-bytes", "lots"],
            ["--wl-max-shm-bytes", "64XiB"],
            ["--wl-max-shm-bytes", "iB"],
        ] {
            let mut args = vec!["bulkhead-vmm", "--kernel", "k"];
            args.extend(bad);
            assert!(Cli::try_parse_from(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wl_sizes() {
        assert_eq!(parse_wl_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_wl_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_wl_size("64M"), Ok(64 << 20));
        assert_eq!(parse_wl_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_wl_size("4KiB"), Ok(4096));
        assert_eq!(parse_wl_size("4096"), Ok(4096));
        assert!(
            parse_wl_size("4096B").is_err(),
            "a bare B is not a unit here"
        );
        assert!(parse_wl_size("MiB").is_err());
        assert!(parse_wl_size("1TiB").is_err());
    }

    #[test]
    fn hub_fd_implies_wl() {
        let c = Cli::try_parse_from(["bulkhead-vmm", "--kernel", "k", "--hub-fd", "3"]).unwrap();
        let v = VmConfig::from(c);
        assert_eq!(v.hub_fd, Some(3));
        assert!(v.wl);
        assert!(Cli::try_parse_from(["bulkhead-vmm", "--kernel", "k", "--hub-fd", "x"]).is_err());
    }

    #[test]
    fn fds_are_taken_once_and_must_be_open() {
        let f = tempfile::tempfile().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        let mut t = FdTaker::default();
        let owned = t.take(fd).unwrap();
        assert!(matches!(t.take(fd), Err(ConfigError::BadFd(_))));
        drop(owned);
        assert!(matches!(
            FdTaker::default().take(fd),
            Err(ConfigError::BadFd(_))
        ));
        assert!(matches!(
            FdTaker::default().take(1),
            Err(ConfigError::BadFd(1))
        ));
    }
}
