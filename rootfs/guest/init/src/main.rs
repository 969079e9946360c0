//! `bulkhead-guest-init`: PID 1 of a Bulkhead guest.
//!
//! In order: block every signal (read from a signalfd), mount the early filesystems, read
//! `/etc/bulkhead/guest.toml`, load its modules, make its Debian root disk `/` if it names
//! packages, start its programs (each with `wait_for` once its path exists), then wait: their output
//! goes to the console as `<name>: <line>`, children are reaped, and when the last program
//! has ended the VM powers off. SIGTERM, SIGINT, SIGPWR, SIGUSR1/2 or the power button (the
//! VMM's ACPI GED) stop the programs (SIGTERM to each process group, SIGKILL after the grace
//! time) and power off too. It never exits; a panic powers off as well.
//!
//! Run as any other process it only checks a configuration (`check FILE`).

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bulkhead_guest_init::config::{GuestConfig, CONFIG_PATH, POWER_BUTTON_MODULES, ROOT_MODULES};
use bulkhead_guest_init::programs::Programs;
use bulkhead_init::input::{self, PowerButton};
use bulkhead_init::runtime::poll_groups;
use bulkhead_init::shutdown::{self, PowerAction};
use bulkhead_init::signals::SignalAction;
use bulkhead_init::{log as initlog, modules, mounts, panic, signals};
use clap::{Parser, Subcommand};
use log::{error, info, warn, LevelFilter};
use nix::poll::PollTimeout;
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

/// The tag of this init's own console lines.
const TAG: &str = "bulkhead-guest-init";

/// How long output is read after the last program ended while others still hold it open.
const OUTPUT_LINGER: Duration = Duration::from_secs(1);

/// How often the paths programs wait for are looked at.
const WAIT_POLL: Duration = Duration::from_millis(100);

fn main() {
    panic::install();
    if std::process::id() == 1 {
        pid1();
    }
    std::process::exit(cli());
}

/// The small PID 1 of a Bulkhead guest. As PID 1 it ignores its arguments; run as any other
/// process it checks a guest configuration.
#[derive(Parser)]
#[command(name = "bulkhead-guest-init", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Parse and validate a guest configuration, print what the guest would do.
    Check {
        /// The file (`/etc/bulkhead/guest.toml` in a guest image).
        #[arg(default_value = CONFIG_PATH)]
        file: PathBuf,
    },
}

fn cli() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Check { file } => match GuestConfig::load(&file) {
            Ok(c) => {
                println!("modules: {}", c.modules.join(" "));
                for p in &c.program {
                    println!("program {}: {}", p.name, p.exec.join(" "));
                }
                0
            }
            Err(e) => {
                eprintln!("{TAG}: {e}");
                1
            }
        },
    }
}

fn pid1() -> ! {
    let blocked = signals::block_all();
    initlog::set_tag(TAG);
    initlog::install(LevelFilter::Info);
    if let Err(e) = blocked {
        error!("cannot block signals: {e}");
    }
    let mounted = mounts::mount_all(&mounts::early_mounts());
    initlog::reopen();
    // The guest's uptime here is what benchmarks subtract from the wall time the VMM took to
    // get this far (`bulkhead-rootfs bench vmm`): the rest is the VMM's own part.
    match boottime() {
        Some(t) => info!("started, uptime {:.3} s", t.as_secs_f64()),
        None => info!("started"),
    }
    let opts = bulkhead_init::cmdline::BootOptions::from_cmdline(
        &bulkhead_init::cmdline::read_proc_cmdline(),
    );
    if let Some(level) = opts.loglevel {
        initlog::set_level(level);
    }
    if let Err(e) = signals::disable_ctrl_alt_del() {
        warn!("cannot disable ctrl-alt-del: {e}");
    }
    let config = match GuestConfig::load(Path::new(CONFIG_PATH)) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            error!("nothing to run: powering off");
            shutdown::finish(PowerAction::Poweroff, &mounted);
        }
    };
    let mut wanted: Vec<String> = Vec::new();
    if config.has_root() {
        wanted.extend(ROOT_MODULES.iter().map(|m| m.to_string()));
    }
    wanted.extend(config.modules.iter().cloned());
    wanted.extend(POWER_BUTTON_MODULES.iter().map(|m| m.to_string()));
    modules::load_all(&modules::modules_dir(), &wanted);
    if config.has_root() {
        match bulkhead_guest_init::root::switch() {
            Ok(()) => {
                initlog::reopen();
                info!(
                    "root filesystem: {} (read-only)",
                    bulkhead_guest_init::config::ROOT_DEVICE
                );
            }
            Err(e) => {
                error!("cannot switch to the root filesystem: {e}");
                error!("nothing to run: powering off");
                shutdown::finish(PowerAction::Poweroff, &mounted);
            }
        }
    }
    let mut buttons = input::scan(Path::new("/dev/input"));
    let sfd = match signals::signal_fd() {
        Ok(sfd) => sfd,
        Err(e) => {
            error!("cannot create signalfd: {e}; powering off");
            shutdown::finish(PowerAction::Poweroff, &mounted);
        }
    };
    let mut programs = Programs::start(&config);
    info!("ready");
    let grace = Duration::from_millis(config.stop_grace_ms);
    run(&mut programs, &sfd, &mut buttons, grace);
    // Whatever the programs left behind (orphans, daemons) gets the same treatment.
    programs.close_outputs();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), Signal::SIGTERM);
    settle(&mut programs, &sfd, Duration::from_millis(200));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), Signal::SIGKILL);
    settle(&mut programs, &sfd, Duration::from_millis(200));
    shutdown::finish(PowerAction::Poweroff, &mounted)
}

/// CLOCK_BOOTTIME: the time since the guest kernel's clock started (it counts from early in
/// the kernel's setup, after the decompressor).
fn boottime() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives for the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// Why the guest stops early.
enum StopReason {
    Signal(Signal),
    PowerButton(PathBuf),
}

/// Runs until every program has ended (after a stop request, until the grace time is up).
fn run(programs: &mut Programs, sfd: &SignalFd, buttons: &mut Vec<PowerButton>, grace: Duration) {
    let mut kill_at: Option<Instant> = None;
    // When the last program has ended but something it started still holds its output
    // open, the output gets a moment more and is then let go.
    let mut outputs_until: Option<Instant> = None;
    loop {
        programs.reap();
        if kill_at.is_none() {
            programs.start_ready();
        } else {
            programs.cancel_waiting();
        }
        if programs.all_ended() {
            info!("all programs ended");
            return;
        }
        if !programs.any_running() {
            let until = *outputs_until.get_or_insert_with(|| Instant::now() + OUTPUT_LINGER);
            if Instant::now() >= until {
                info!("all programs ended (their output is still held open: let go)");
                return;
            }
        }
        if let Some(at) = kill_at {
            if Instant::now() >= at {
                if programs.any_running() {
                    warn!("programs still running after the grace time: SIGKILL");
                    programs.signal_all(Signal::SIGKILL);
                }
                return;
            }
        }
        // A program waiting for its path is looked at again every WAIT_POLL.
        let waiting = programs.any_waiting().then(|| Instant::now() + WAIT_POLL);
        let timeout = [kill_at, outputs_until, waiting]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
        let (sig_ready, button_ready, pipe_ready) = {
            let button_fds: Vec<BorrowedFd<'_>> = buttons.iter().map(|b| b.as_fd()).collect();
            wait(sfd.as_fd(), &button_fds, &programs.pipe_fds(), timeout)
        };
        let mut stop = None;
        if sig_ready {
            // The host init's meanings; a guest has one way to end: power off.
            for sig in signals::read_pending(sfd)
                .into_iter()
                .filter_map(|n| Signal::try_from(n).ok())
            {
                match signals::action(sig) {
                    SignalAction::Reap => programs.reap(),
                    SignalAction::Ignore => {}
                    SignalAction::Reboot | SignalAction::Poweroff | SignalAction::Halt => {
                        stop = stop.or(Some(StopReason::Signal(sig)))
                    }
                }
            }
        }
        // A button that went away leaves the watch list (it would poll ready forever).
        if let Some(path) = input::check_ready(buttons, &button_ready) {
            stop = stop.or(Some(StopReason::PowerButton(path)));
        }
        if pipe_ready.iter().any(|r| *r) {
            programs.drain(&pipe_ready);
        }
        if let (Some(reason), None) = (stop, kill_at) {
            match reason {
                StopReason::Signal(sig) => info!("received {sig}: stopping the programs"),
                StopReason::PowerButton(p) => {
                    info!(
                        "power button pressed ({}): stopping the programs",
                        p.display()
                    )
                }
            }
            programs.signal_all(Signal::SIGTERM);
            kill_at = Some(Instant::now() + grace);
        }
    }
}

/// Reaps for up to `time` (used after kill(-1) at the very end).
fn settle(programs: &mut Programs, sfd: &SignalFd, time: Duration) {
    let end = Instant::now() + time;
    loop {
        programs.reap();
        if !bulkhead_init::shutdown::have_children() {
            return;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let _ = wait(sfd.as_fd(), &[], &[], left.min(Duration::from_millis(50)));
        let _ = signals::read_pending(sfd);
    }
}

/// One poll over the signalfd, the power buttons and the output pipes.
fn wait(
    sfd: BorrowedFd<'_>,
    buttons: &[BorrowedFd<'_>],
    pipes: &[BorrowedFd<'_>],
    timeout: Duration,
) -> (bool, Vec<bool>, Vec<bool>) {
    // Round up so a wakeup never comes a hair before the deadline.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut groups = poll_groups(&[&[sfd], buttons, pipes], timeout).into_iter();
    let mut next = || groups.next().unwrap_or_default();
    let sig = next().first().copied().unwrap_or(false);
    (sig, next(), next())
}
