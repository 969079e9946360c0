//! `bulkhead-vmmctl SOCKET status|shutdown|kill`: a client for bulkhead-vmm's control socket.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let req = match cli.command {
        Command::Status => ControlRequest::Status,
        Command::Shutdown => ControlRequest::Shutdown,
        Command::Kill => ControlRequest::Kill,
    };
    let result = Channel::connect(&cli.socket)
        .and_then(|c| c.send(&req, &[]).map(|_| c))
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
