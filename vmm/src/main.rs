//! `bulkhead-vmm`: boots one Linux VM and exits with a status that says how it ended.

use std::io::{IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::config::{Cli, FdTaker, Source, VmConfig};
use bulkhead_vmm::control::ControlServer;
use bulkhead_vmm::devices::legacy::serial::SerialOut;
use bulkhead_vmm::devices::legacy::terminal::RawTerminal;
use bulkhead_vmm::devices::virtio::net::device::Net;
use bulkhead_vmm::devices::virtio::net::hub::WlHub;
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::devices::virtio::wl::device::Wl;
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::sockets::{WlSocket, WlSockets};
use bulkhead_vmm::seccomp::{self, ThreadKind};
use bulkhead_vmm::vm::Vm;
use bulkhead_vmm::vstate::exit::ExitReason;
use bulkhead_vmm::vstate::vcpu::monotonic_now;

fn init_logging(level: log::LevelFilter) {
    struct Stderr(log::LevelFilter);
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                let _ = write_log_line(&mut std::io::stderr(), r.level(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let _ = log::set_logger(Box::leak(Box::new(Stderr(level))));
    log::set_max_level(level);
}

/// Writes one log line (`bulkhead-vmm: LEVEL: message`) with a single `write`: stderr is
/// unbuffered, and `writeln!` would hand it the line in pieces, between which the guest's
/// serial console (stdout, the same pipe to init) could land a line of its own, so that a
/// guest line got this VMM's prefix and the log line lost it (seen in a test run).
fn write_log_line(
    out: &mut impl Write,
    level: log::Level,
    args: &std::fmt::Arguments,
) -> std::io::Result<()> {
    let msg = args.to_string();
    let msg = msg.strip_prefix("bulkhead-vmm: ").unwrap_or(&msg);
    out.write_all(format!("bulkhead-vmm: {level}: {msg}\n").as_bytes())
}

/// Who this VMM runs as: uid, gid, its effective capabilities and no_new_privs, asked of
/// the kernel directly (a jailed VMM has no /proc).
fn credentials() -> String {
    let caps = match caps::read(None, caps::CapSet::Effective) {
        Ok(c) if c.is_empty() => "no capabilities".to_string(),
        Ok(c) => format!("capabilities {c:?}"),
        Err(_) => "capabilities unknown".to_string(),
    };
    // SAFETY: getuid/getgid take no arguments; prctl(PR_GET_NO_NEW_PRIVS) takes integers.
    let (uid, gid, nnp) = unsafe {
        (
            libc::getuid(),
            libc::getgid(),
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        )
    };
    format!("uid {uid} gid {gid}, {caps}, no_new_privs {nnp}")
}

/// No filesystem access at all from here on (Landlock, where the kernel has it): every file
/// the VMM needs is open. Threads started later inherit it.
fn forbid_filesystem() {
    use landlock::{Access, AccessFs, Ruleset, RulesetAttr, RulesetStatus, ABI};
    let result = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI::V6))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self());
    match result {
        Ok(s) if s.ruleset == RulesetStatus::NotEnforced => {
            log::warn!("bulkhead-vmm: Landlock not available: filesystem access not restricted")
        }
        Ok(_) => log::info!("bulkhead-vmm: Landlock: no filesystem access from here on"),
        Err(e) => log::warn!("bulkhead-vmm: Landlock: {e}"),
    }
}

/// How long each setup step took, logged once before the vCPUs start (with the
/// CLOCK_MONOTONIC time `run` began: `bulkhead-rootfs bench vmm` reads both).
struct SetupTimer {
    start: Duration,
    last: Instant,
    steps: Vec<(&'static str, Duration)>,
}

impl SetupTimer {
    fn new() -> Self {
        Self {
            start: monotonic_now(),
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    /// The step `name` ended now.
    fn step(&mut self, name: &'static str) {
        let now = Instant::now();
        self.steps.push((name, now - self.last));
        self.last = now;
    }

    fn log(&self) {
        let total: Duration = self.steps.iter().map(|(_, d)| *d).sum();
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e3))
            .collect();
        log::info!(
            "bulkhead-vmm: set up in {:.1} ms ({}) from CLOCK_MONOTONIC {}.{:09} s",
            total.as_secs_f64() * 1e3,
            steps.join(", "),
            self.start.as_secs(),
            self.start.subsec_nanos()
        );
    }
}

fn run(cfg: VmConfig) -> Result<ExitReason, String> {
    let mut timer = SetupTimer::new();
    log::info!("bulkhead-vmm: running as {}", credentials());
    seccomp::enable(cfg.seccomp);
    if let Some(attempt) = &cfg.test_escape {
        return Ok(escape::attempt(attempt));
    }
    let mut fds = FdTaker::default();
    let kvm = match cfg.kvm_fd {
        Some(fd) => {
            let owned = fds.take(fd).map_err(|e| e.to_string())?;
            // SAFETY: `owned` is an open descriptor the parent gave us as /dev/kvm; Kvm takes
            // over its ownership.
            unsafe {
                <kvm_ioctls::Kvm as std::os::fd::FromRawFd>::from_raw_fd(
                    std::os::fd::IntoRawFd::into_raw_fd(owned),
                )
            }
        }
        None => kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?,
    };
    timer.step("kvm");
    // The serial device writes a line at a time (`serial::LineOut`), byte by byte to a
    // terminal, from its own thread behind a bounded queue (`serial::SerialOut`): a
    // destination that takes nothing never holds up a vCPU.
    let serial_out = match &cfg.serial_out {
        None => SerialOut::lines(Box::new(std::io::sink())),
        Some(None) if std::io::stdout().is_terminal() => {
            SerialOut::through(Box::new(std::io::stdout()))
        }
        Some(None) => SerialOut::lines(Box::new(std::io::stdout())),
        Some(Some(Source::Fd(fd))) => SerialOut::lines(Box::new(std::fs::File::from(
            fds.take(*fd).map_err(|e| e.to_string())?,
        ))),
        Some(Some(Source::Path(p))) => SerialOut::lines(Box::new(
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?,
        )),
    }
    .map_err(|e| format!("serial output thread: {e}"))?;
    let mut kernel = fds.open(&cfg.kernel, false).map_err(|e| e.to_string())?;
    let mut initramfs = match &cfg.initramfs {
        Some(s) => Some(fds.open(s, false).map_err(|e| e.to_string())?),
        None => None,
    };

    let mut vm = Vm::new(&kvm, cfg.memory, cfg.vcpus, serial_out).map_err(|e| e.to_string())?;
    timer.step("vm");
    if cfg.rng {
        vm.add_virtio_device(Box::new(Rng::new()))
            .map_err(|e| e.to_string())?;
    }
    let wl_sockets = if cfg.wl {
        let sockets = WlSockets::new();
        for (name, path) in &cfg.wl_sockets {
            sockets
                .add(name, WlSocket::Listening(path.clone()))
                .map_err(|e| e.to_string())?;
        }
        for (name, fd) in &cfg.wl_socket_fds {
            let owned = fds
                .take(*fd)
                .map_err(|e| format!("--wl-socket-fd {name}={fd}: {e}"))?;
            bulkhead_vmm::control::check_stream_socket(&owned)
                .map_err(|e| format!("--wl-socket-fd {name}={fd}: {e}"))?;
            sockets
                .add(name, WlSocket::NonListening(UnixStream::from(owned)))
                .map_err(|e| e.to_string())?;
        }
        let mut wl = Wl::new(
            sockets.clone(),
            Some(vm.memory_slots().clone()),
            cfg.wl_limits,
        )
        .map_err(|e| e.to_string())?;
        if cfg.test_drop_wl_interrupts > 0 {
            log::warn!(
                "bulkhead-vmm: virtio-wl: fault injection: dropping its first {} interrupts",
                cfg.test_drop_wl_interrupts
            );
            wl.drop_interrupts(cfg.test_drop_wl_interrupts);
        }
        if let Some(fd) = cfg.hub_fd {
            let fd = fds.take(fd).map_err(|e| format!("--hub-fd: {e}"))?;
            let link = HubLink::new(fd, sockets.clone()).map_err(|e| format!("--hub-fd: {e}"))?;
            log::info!("bulkhead-vmm: virtio-wl: hub channel ready (Hello sent)");
            wl.set_hub(link);
        }
        let wl_state = wl.state().clone();
        vm.add_virtio_device(Box::new(wl))
            .map_err(|e| e.to_string())?;
        if let Some((service, mac)) = &cfg.net {
            if cfg.hub_fd.is_none() {
                return Err(format!("--net {service}: needs the hub channel (--hub-fd)"));
            }
            let mut net = Net::new(*mac, service).map_err(|e| format!("virtio-net: {e}"))?;
            net.start_link(Box::new(WlHub(wl_state)))
                .map_err(|e| format!("virtio-net: {e}"))?;
            vm.add_virtio_device(Box::new(net))
                .map_err(|e| e.to_string())?;
        }
        Some(sockets)
    } else {
        None
    };
    for d in &cfg.disks {
        let f = fds
            .open(d, !cfg.disk_read_only)
            .map_err(|e| e.to_string())?;
        vm.add_disk(f, cfg.disk_read_only)
            .map_err(|e| e.to_string())?;
    }
    let vfio = if cfg.vfio.is_empty() {
        None
    } else {
        let req = bulkhead_vmm::devices::vfio::attach::VfioRequest::from_args(
            &cfg.vfio,
            cfg.vfio_container_fd,
            &cfg.vfio_group_fds,
            &mut fds,
        )?;
        Some(bulkhead_vmm::devices::vfio::attach::VfioDevices::attach(
            &mut vm, req,
        )?)
    };
    timer.step("devices");
    vm.load_linux(&mut kernel, initramfs.as_mut(), &cfg.cmdline)
        .map_err(|e| e.to_string())?;
    drop(kernel);
    drop(initramfs);
    timer.step("kernel");

    // Every file is open: from here on, none by path.
    forbid_filesystem();
    // Interactive use: the guest gets keys raw; restored when `run` returns.
    let _raw_terminal = if cfg.serial_input {
        RawTerminal::enable()
    } else {
        None
    };
    let input: Option<Box<dyn std::io::Read + Send>> = if cfg.serial_input {
        Some(Box::new(std::io::stdin()))
    } else {
        None
    };
    let control_channel = match cfg.control_fd {
        Some(fd) => Some(Channel::from_fd(fds.take(fd).map_err(|e| e.to_string())?)),
        None => None,
    };
    timer.step("other");
    timer.log();
    let running = vm.start(input).map_err(|e| e.to_string())?;
    {
        let button = running.control_target();
        let _stop_thread = bulkhead_vmm::vstate::stop::spawn(
            Box::new(move || button.power_button.press()),
            running.exit_signal().clone(),
        )
        .map_err(|e| format!("stop-signal thread: {e}"))?;
    }
    if let Some(s) = wl_sockets {
        running.control_target().set_wl_sockets(s);
    }
    let _control = if cfg.control_socket.is_some() || control_channel.is_some() {
        Some(
            ControlServer::start(
                running.control_target(),
                cfg.control_socket.as_deref(),
                control_channel,
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    // Every long-lived thread is running and filtered: now the main thread too.
    seccomp::apply(ThreadKind::Main).map_err(|e| e.to_string())?;
    log::info!(
        "bulkhead-vmm: seccomp filters installed ({:?} mode): main, vcpu, worker, control",
        cfg.seccomp
    );
    let reason = running.wait();
    let reason = running.stop(reason);
    if let Some(v) = vfio {
        v.finish();
    }
    Ok(reason)
}

mod escape;

fn main() -> ExitCode {
    // Before any thread exists, so every thread inherits the mask (see vstate::stop).
    let blocked = bulkhead_vmm::vstate::stop::block();
    let cli = Cli::parse();
    init_logging(cli.log_level);
    if let Err(e) = blocked {
        log::warn!("bulkhead-vmm: cannot block SIGTERM/SIGINT: {e}");
    }
    let cfg = VmConfig::from(cli);
    let reason = match run(cfg) {
        Ok(r) => r,
        Err(e) => ExitReason::VmmError(e),
    };
    match &reason {
        ExitReason::VmmError(e) => log::error!("bulkhead-vmm: {e}"),
        ExitReason::GuestCrash(e) => log::error!("bulkhead-vmm: guest crashed: {e}"),
        r => log::info!("bulkhead-vmm: VM ended: {r:?}"),
    }
    let _ = std::io::stdout().flush();
    ExitCode::from(reason.exit_code() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that keeps each `write` call apart.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_line_is_one_write_so_the_guests_console_cannot_land_inside_it() {
        let mut w = Writes::default();
        let n = 3;
        write_log_line(
            &mut w,
            log::Level::Warn,
            &format_args!("bulkhead-vmm: virtio-wl: queue {n}'s interrupt dropped"),
        )
        .unwrap();
        assert_eq!(
            w.0,
            vec![b"bulkhead-vmm: WARN: virtio-wl: queue 3's interrupt dropped\n".to_vec()]
        );
    }
}
