//! `bulkhead-hub`: the policy-checked fd broker between VMs. See `bulkhead-hub --help` and
//! docs/ipc.md.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_ipc::bench::{self, BenchOptions};
use bulkhead_ipc::hub::budget::{
    Budgets, DEFAULT_VM_BYTES, DEFAULT_VM_FDS, DEFAULT_VM_INFLIGHT, DEFAULT_VM_TOMBSTONES,
};
use bulkhead_ipc::hub::{Hub, HubConfig, DEFAULT_MAX_CONNS_PER_VM, DEFAULT_QUEUE};
use bulkhead_ipc::Channel;
use bulkhead_ipc::MAX_FDS;
use bulkhead_policy::RootDir;
use clap::{Parser, Subcommand};

/// The Bulkhead hub: service registry, fd broker, memfd server and policy control socket.
///
/// Started by init before the VMs, with one inherited SOCK_SEQPACKET channel per VM.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Persistent policy directory.
    #[arg(long, default_value = "/etc/bulkhead/policy.d")]
    policy_dir: PathBuf,
    /// Transient policy directory (loaded after the persistent one when present).
    #[arg(long)]
    transient_dir: Option<PathBuf>,
    /// Policy control socket (policyctl apply/status/log).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Audit log file (JSON lines); stderr when absent.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// A VM channel init made: NAME=FD (an inherited SOCK_SEQPACKET socket). Repeatable.
    #[arg(long = "vm", value_name = "NAME=FD")]
    vms: Vec<String>,
    /// Events queued toward one side of a connection before sends toward it are refused
    /// `Busy` (and 4 × this on a VM channel).
    #[arg(long, default_value_t = DEFAULT_QUEUE)]
    queue: usize,
    /// Most connections one VM may open, mediated sockets included (each costs the hub
    /// two fds).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNS_PER_VM)]
    max_conns_per_vm: usize,
    /// Most fds the hub holds for one VM (queued toward it, in its unfinished sends).
    #[arg(long, default_value_t = DEFAULT_VM_FDS)]
    vm_fds: usize,
    /// Most bytes the hub holds for one VM.
    #[arg(long, default_value_t = DEFAULT_VM_BYTES)]
    vm_bytes: usize,
    /// Most fds in flight to one VM (sent, not yet received by its VMM).
    #[arg(long, default_value_t = DEFAULT_VM_INFLIGHT)]
    vm_inflight: usize,
    /// Most tombstones charged to one VM.
    #[arg(long, default_value_t = DEFAULT_VM_TOMBSTONES)]
    vm_tombstones: usize,
    /// Exit when every VM channel has closed.
    #[arg(long)]
    exit_when_idle: bool,
    /// Run even with effective uid 0. The hub should run as its own unprivileged user
    /// (init's `[hub] user`): as root it would bypass the file permissions that keep
    /// read-only memfds read-only, and a bug in it would own the host. For tests only.
    #[arg(long)]
    allow_root: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Messages-with-one-fd per second and latency through the hub vs a direct socketpair.
    Bench {
        /// Messages per throughput run.
        #[arg(long, default_value_t = 20000)]
        messages: u32,
        /// Latency samples per path.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10000))]
        samples: u32,
    },
}

fn adopt_fd(spec: &str) -> Result<(String, OwnedFd), String> {
    let (name, fd) = spec
        .split_once('=')
        .ok_or_else(|| format!("--vm {spec}: expected NAME=FD"))?;
    if name.is_empty() || name.len() > 64 {
        return Err(format!("--vm {spec}: bad VM name"));
    }
    let raw: RawFd = fd
        .parse()
        .map_err(|_| format!("--vm {spec}: {fd} is not an fd number"))?;
    if raw <= 2 {
        return Err(format!("--vm {spec}: fd {raw} is a standard stream"));
    }
    // SAFETY: F_GETFD only queries the descriptor table entry.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(format!("--vm {spec}: fd {raw} is not open"));
    }
    // SAFETY: the fd is open (checked above), was inherited for this purpose, and main
    // refuses the same number twice, so nothing else in this process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    let ty = nix::sys::socket::getsockopt(&owned.as_fd(), nix::sys::socket::sockopt::SockType)
        .map_err(|e| format!("--vm {spec}: fd {raw} is not a socket: {e}"))?;
    if ty != nix::sys::socket::SockType::SeqPacket {
        return Err(format!(
            "--vm {spec}: fd {raw} is not a SOCK_SEQPACKET socket"
        ));
    }
    // Keep it out of any child we might start.
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("--vm {spec}: {e}"))?;
    Ok((name.to_string(), owned))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(Cmd::Bench { messages, samples }) = cli.cmd {
        return run_bench(messages, samples);
    }
    let mut vms = Vec::new();
    let mut seen_fds = Vec::new();
    for spec in &cli.vms {
        let fd_part = spec.split_once('=').map(|(_, f)| f.to_string());
        if let Some(f) = fd_part {
            if seen_fds.contains(&f) {
                eprintln!("error: --vm {spec}: fd given twice");
                return ExitCode::from(2);
            }
            seen_fds.push(f);
        }
        match adopt_fd(spec) {
            Ok((name, fd)) => {
                if vms.iter().any(|(n, _): &(String, Channel)| *n == name) {
                    eprintln!("error: --vm {spec}: VM {name} given twice");
                    return ExitCode::from(2);
                }
                vms.push((name, Channel::from_fd(fd)));
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if nix::unistd::geteuid().is_root() && !cli.allow_root {
        eprintln!(
            "error: bulkhead-hub refuses to run as root (effective uid 0): it mediates every fd \
             between VMs and must run as its own unprivileged user (set `user` in the \
             [hub] section of system.toml), so that a bug in it cannot own the host and \
             it cannot bypass the file permissions that keep read-only memfds read-only; \
             pass --allow-root to run it as root anyway (tests only)"
        );
        return ExitCode::from(2);
    }
    let mut roots = vec![RootDir {
        path: cli.policy_dir.clone(),
        prefix: String::new(),
        required: false,
    }];
    if let Some(t) = &cli.transient_dir {
        roots.push(RootDir {
            path: t.clone(),
            prefix: "run/".into(),
            required: false,
        });
    }
    let cfg = HubConfig {
        roots,
        audit: cli.audit_log.clone(),
        control_socket: cli.control_socket.clone(),
        exit_when_no_vms: cli.exit_when_idle,
        budgets: Budgets {
            fds: cli.vm_fds.max(MAX_FDS),
            bytes: cli.vm_bytes,
            inflight: cli.vm_inflight.max(MAX_FDS),
            tombstones: cli.vm_tombstones,
            ..Budgets::new(cli.queue, cli.max_conns_per_vm)
        },
    };
    let mut hub = match Hub::new(cfg, vms) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "hub running: policy generation {} ({})",
        hub.store().current().number,
        hub.store().current().policy.tree_hash()
    );
    match hub.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(messages: u32, samples: u32) -> ExitCode {
    match bench::run(BenchOptions { messages, samples }) {
        Ok(r) => {
            println!(
                "{:<28} {:>14} {:>10} {:>10}",
                "path", "msgs/s (1 fd)", "p50 µs", "p99 µs"
            );
            println!(
                "{:<28} {:>14.0} {:>10.1} {:>10.1}",
                "direct socketpair", r.direct_rate, r.direct_p50_us, r.direct_p99_us
            );
            println!(
                "{:<28} {:>14.0} {:>10.1} {:>10.1}",
                "through bulkhead-hub", r.hub_rate, r.hub_p50_us, r.hub_p99_us
            );
            let ratio = if r.direct_rate > 0.0 {
                r.hub_rate / r.direct_rate
            } else {
                0.0
            };
            println!("hub/direct rate ratio: {ratio:.3} (goal: >= 0.5)");
            println!(
                "BENCH hub rate_ratio_vs_direct={ratio:.3} p50_us={:.1} p99_us={:.1} direct_p99_us={:.1}",
                r.hub_p50_us, r.hub_p99_us, r.direct_p99_us
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
