//! `bulkhead-vmmctl SOCKET status|shutdown|kill|wl-add`: a client for bulkhead-vmm's control
//! socket.

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_ipc::channel::Channel;
use bulkhead_vmm::control::{ControlRequest, ControlResponse};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Command {
    /// Print the VM's status.
    Status,
    /// Press the ACPI power button (the guest shuts itself down).
    Shutdown,
    /// Stop the VM at once.
    Kill,
    /// Add a virtio_wl socket: --name NAME (or a `%d` pattern) with --path (listening) or
    /// --connect (connect there now and hand over the connection); prints the chosen name.
    WlAdd,
}

/// Talks to a running bulkhead-vmm over its control socket.
#[derive(Debug, Parser)]
#[command(
    name = "bulkhead-vmmctl",
    version,
    after_help = "Exit status: 0 done, 1 error."
)]
struct Cli {
    /// The VMM's --control-socket path.
    socket: PathBuf,
    /// What to ask.
    command: Command,
    /// wl-add: the name or pattern (e.g. wl-conn-%d).
    #[arg(long)]
    name: Option<String>,
    /// wl-add: a listening socket's path.
    #[arg(long, conflicts_with = "connect")]
    path: Option<PathBuf>,
    /// wl-add: connect to this socket and give the connection (non-listening).
    #[arg(long)]
    connect: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.command {
        Command::Status => ControlRequest::Status,
        Command::Shutdown => ControlRequest::Shutdown,
        Command::Kill => ControlRequest::Kill,
        Command::WlAdd => ControlRequest::WlAdd {
            name: cli.name.clone().unwrap_or_else(|| "wl-conn-%d".into()),
            path: cli.path.clone(),
        },
    };
    let mut fds: Vec<std::os::fd::OwnedFd> = Vec::new();
    if let (Command::WlAdd, Some(p)) = (cli.command, &cli.connect) {
        match std::os::unix::net::UnixStream::connect(p) {
            Ok(s) => fds.push(s.into()),
            Err(e) => {
                eprintln!("bulkhead-vmmctl: {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
    }
    // The VMM that answers must be root, us, or the owner of the socket's directory (a
    // directory only that owner can write).
    let result =
        Channel::connect_trusted(&cli.socket, bulkhead_ipc::channel::TrustedServer::DirOwner)
            .and_then(|c| {
                use std::os::fd::AsFd;
                let b: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                c.send(&req, &b).map(|_| c)
            })
            .and_then(|c| c.recv::<ControlResponse>().map(|(r, _)| r));
    match result {
        Ok(ControlResponse::Status(s)) => {
            println!(
                "running={} exit_reason={} vcpus={} memory_bytes={} power_button_presses={} devices={}",
                s.running,
                s.exit_reason.as_deref().unwrap_or("-"),
                s.vcpus,
                s.memory_bytes,
                s.power_button_presses,
                s.devices.join(",")
            );
            ExitCode::SUCCESS
        }
        Ok(ControlResponse::Done) => ExitCode::SUCCESS,
        Ok(ControlResponse::WlAdded(name)) => {
            println!("{name}");
            ExitCode::SUCCESS
        }
        Ok(ControlResponse::Error(e)) => {
            eprintln!("bulkhead-vmmctl: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bulkhead-vmmctl: {}: {e}", cli.socket.display());
            ExitCode::FAILURE
        }
    }
}
