//! `bulkhead-init`: PID 1 of a Bulkhead host, and its own control client.
//!
//! As PID 1 it ignores argv (the kernel passes leftovers there), sets the host up in a
//! fixed order, runs the event loop, and on shutdown stops everything and calls reboot(2).
//! It never returns. As any other process it is the client of the control socket
//! (`bulkhead-init status|poweroff|reboot`), or, for tests, runs the supervisor alone as a
//! child subreaper (`bulkhead-init supervise`).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead_init::cmdline::BootOptions;
use bulkhead_init::config::{self, SystemConfig};
use bulkhead_init::control::{self, ControlServer, Request, Response};
use bulkhead_init::jail::JailPaths;
use bulkhead_init::runtime::Runtime;
use bulkhead_init::services::{Clock, Services};
use bulkhead_init::shutdown::{self, PowerAction};
use bulkhead_init::{devices, input, log as initlog, modules, mounts, panic, signals};
use clap::{Parser, Subcommand};
use log::{error, info, warn, LevelFilter};

fn main() {
    panic::install();
    if std::process::id() == 1 {
        pid1();
    }
    std::process::exit(cli());
}

/// Reads and validates the system file; a broken one is logged loudly and replaced by an
/// empty system (no services, `when_idle = "stay"`).
fn load_system(path: &Path) -> SystemConfig {
    match SystemConfig::load(path) {
        Ok(c) => {
            info!("system {}: {} services", path.display(), c.service.len());
            c
        }
        Err(e) => {
            error!("{e}");
            error!("configuration rejected: running with no services");
            SystemConfig::default()
        }
    }
}

fn pid1() -> ! {
    // 1. Signals before anything else (and before any thread could exist).
    let blocked = signals::block_all();
    initlog::install(LevelFilter::Info);
    if let Err(e) = blocked {
        error!("cannot block signals: {e}");
    }

    // 2. Filesystems, then reopen the console and kmsg on the new /dev.
    let mounted = mounts::mount_all(&mounts::early_mounts());
    initlog::reopen();

    // 3. Kernel command line.
    let opts = BootOptions::from_cmdline(&bulkhead_init::cmdline::read_proc_cmdline());
    if let Some(level) = opts.loglevel {
        initlog::set_level(level);
    }
    for w in &opts.warnings {
        warn!("{w}");
    }

    // 4. Ctrl-alt-del becomes SIGINT.
    if let Err(e) = signals::disable_ctrl_alt_del() {
        warn!("cannot disable ctrl-alt-del: {e}");
    }

    // 5. Configuration.
    let path = opts
        .system
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH));
    let system = load_system(&path);
    if let Some(name) = &system.host.hostname {
        if let Err(e) = nix::unistd::sethostname(name) {
            warn!("cannot set hostname {name}: {e}");
        }
    }

    // 6. Kernel modules, each with its dependencies.
    modules::load_all(&modules::modules_dir(), &system.host.modules);

    // 7. PCI functions the policy grants to VMs go to vfio-pci.
    let vfio_groups = devices::bind_granted(&bulkhead_vfio::SysfsRoot::host());

    // 8. Power buttons (after `button` and `evdev` are loaded).
    let buttons = input::scan(Path::new("/dev/input"));

    // 9. Signalfd and control socket.
    let sfd = match signals::signal_fd() {
        Ok(sfd) => sfd,
        Err(e) => {
            error!("cannot create signalfd: {e}; cannot supervise, powering off");
            shutdown::finish(PowerAction::Poweroff, &mounted);
        }
    };
    if let Err(e) = control::make_private_dir(Path::new(config::INIT_RUNTIME_DIR)) {
        error!("{}: {e}", config::INIT_RUNTIME_DIR);
    }
    let control = match ControlServer::bind(Path::new(control::SOCKET_PATH), 0) {
        Ok(c) => Some(c),
        Err(e) => {
            error!("control socket {}: {e}", control::SOCKET_PATH);
            None
        }
    };

    let mut rt = Runtime {
        clock: Clock::new(),
        services: Services::from_config(&system, &vfio_groups, JailPaths::host()),
        sfd,
        control,
        buttons,
        when_idle: system.host.when_idle,
    };
    info!("ready");
    if opts.test_panic {
        #[allow(clippy::panic)]
        {
            panic!("deliberate panic requested by bulkhead.test_panic=1");
        }
    }

    // 10. The event loop, until a shutdown is requested.
    let action = rt.run();
    info!("shutdown started ({})", action.name());
    rt.stop_services();
    rt.kill_everything(Duration::from_millis(system.host.shutdown_grace_ms));
    shutdown::finish(action, &mounted)
}

/// Bulkhead's PID 1. Run as any other process, it talks to a running init.
#[derive(Parser)]
#[command(name = "bulkhead-init", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the supervised services.
    Status {
        /// Control socket of the init to ask.
        #[arg(long, default_value = control::SOCKET_PATH)]
        socket: PathBuf,
    },
    /// Ask init for an orderly power-off.
    Poweroff {
        /// Control socket of the init to ask.
        #[arg(long, default_value = control::SOCKET_PATH)]
        socket: PathBuf,
    },
    /// Ask init for an orderly reboot.
    Reboot {
        /// Control socket of the init to ask.
        #[arg(long, default_value = control::SOCKET_PATH)]
        socket: PathBuf,
    },
    /// Run the supervisor without being PID 1 (for tests): no mounts, no modules, no
    /// kill(-1), no reboot; this process becomes the child subreaper of its services and
    /// exits once they are stopped.
    Supervise {
        /// The system file.
        #[arg(long)]
        system: PathBuf,
        /// Where to put the control socket (only this uid may use it).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Log level.
        #[arg(long, default_value = "info", value_parser = parse_level)]
        loglevel: LevelFilter,
    },
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse::<LevelFilter>().map_err(|e| e.to_string())
}

fn cli() -> i32 {
    let cli = Cli::parse();
    let (socket, req) = match cli.command {
        Cmd::Status { socket } => (socket, Request::Status),
        Cmd::Poweroff { socket } => (socket, Request::Poweroff),
        Cmd::Reboot { socket } => (socket, Request::Reboot),
        Cmd::Supervise {
            system,
            socket,
            loglevel,
        } => return supervise(&system, socket.as_deref(), loglevel),
    };
    match control::request(&socket, &req) {
        Ok(Response::Ok) => 0,
        Ok(Response::Status { services }) => {
            println!(
                "{:<20} {:<9} {:>7} {:>6}  LAST EXIT",
                "NAME", "STATE", "PID", "STARTS"
            );
            for s in services {
                println!(
                    "{:<20} {:<9} {:>7} {:>6}  {}",
                    s.name,
                    s.state,
                    s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    s.starts,
                    s.last_exit.unwrap_or_else(|| "-".into())
                );
            }
            0
        }
        Ok(Response::Error(e)) => {
            eprintln!("bulkhead-init: refused: {e}");
            1
        }
        Err(e) => {
            eprintln!("bulkhead-init: {e}");
            1
        }
    }
}

fn supervise(system: &Path, socket: Option<&Path>, level: LevelFilter) -> i32 {
    if let Err(e) = signals::block_all() {
        eprintln!("bulkhead-init: cannot block signals: {e}");
        return 1;
    }
    initlog::install_stderr(level);
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("cannot become a child subreaper: {e}");
    }
    let config = load_system(system);
    let sfd = match signals::signal_fd() {
        Ok(sfd) => sfd,
        Err(e) => {
            error!("cannot create signalfd: {e}");
            return 1;
        }
    };
    let control = match socket {
        Some(path) => match ControlServer::bind(path, nix::unistd::geteuid().as_raw()) {
            Ok(c) => Some(c),
            Err(e) => {
                error!("control socket {}: {e}", path.display());
                return 1;
            }
        },
        None => None,
    };
    let mut rt = Runtime {
        clock: Clock::new(),
        services: Services::from_config(
            &config,
            &Default::default(),
            JailPaths {
                cgroup_root: None,
                staging: std::env::temp_dir().join(format!("bulkhead-jail-{}", std::process::id())),
            },
        ),
        sfd,
        control,
        buttons: Vec::new(),
        when_idle: config.host.when_idle,
    };
    info!("ready");
    let action = rt.run();
    info!("shutdown started ({})", action.name());
    rt.stop_services();
    if !rt.reap_remaining(Duration::from_secs(10)) {
        warn!("some descendants are still running");
    }
    // What PID 1 would do now; this mode just exits.
    info!("{}", action.message());
    0
}
