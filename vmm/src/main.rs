//! `bulkhead-vmm`: boots one Linux VM and exits with a status that says how it ended.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::config::{Cli, FdTaker, Source, VmConfig};
use bulkhead_vmm::control::ControlServer;
use bulkhead_vmm::devices::legacy::serial::SerialOut;
use bulkhead_vmm::devices::legacy::terminal::RawTerminal;
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::devices::virtio::wl::device::Wl;
use bulkhead_vmm::devices::virtio::wl::hub::HubLink;
use bulkhead_vmm::devices::virtio::wl::sockets::{WlSocket, WlSockets};
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
                let msg = r.args().to_string();
                let msg = msg.strip_prefix("bulkhead-vmm: ").unwrap_or(&msg);
                let _ = writeln!(std::io::stderr(), "bulkhead-vmm: {}: {msg}", r.level());
            }
        }
        fn flush(&self) {}
    }
    let _ = log::set_logger(Box::leak(Box::new(Stderr(level))));
    log::set_max_level(level);
}

/// Who this VMM runs as: uid, gid and its effective capabilities (from /proc/self/status).
fn credentials() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("?").to_string())
            .unwrap_or_else(|| "?".to_string())
    };
    let caps = match u64::from_str_radix(&field("CapEff:"), 16) {
        Ok(0) => "no capabilities".to_string(),
        Ok(c) => format!("capabilities {c:#x}"),
        Err(_) => "capabilities unknown".to_string(),
    };
    format!(
        "uid {} gid {}, {caps}, no_new_privs {}",
        field("Uid:"),
        field("Gid:"),
        field("NoNewPrivs:")
    )
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
    // terminal.
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
    };
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
        let mut wl = Wl::new(
            sockets.clone(),
            Some(vm.memory_slots().clone()),
            cfg.wl_limits,
        )
        .map_err(|e| e.to_string())?;
        if let Some(fd) = cfg.hub_fd {
            let fd = fds.take(fd).map_err(|e| format!("--hub-fd: {e}"))?;
            let link = HubLink::new(fd, sockets.clone()).map_err(|e| format!("--hub-fd: {e}"))?;
            log::info!("bulkhead-vmm: virtio-wl: hub channel ready (Hello sent)");
            wl.set_hub(link);
        }
        vm.add_virtio_device(Box::new(wl))
            .map_err(|e| e.to_string())?;
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
    let reason = running.wait();
    let reason = running.stop(reason);
    if let Some(v) = vfio {
        v.finish();
    }
    Ok(reason)
}

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
