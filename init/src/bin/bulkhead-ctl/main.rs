//! `bulkhead-ctl`: operate a Bulkhead host through init's control socket.
//!
//! `ls` (every service and VM: state, pid, uid, uptime, restarts, last exit, memory from
//! its cgroup, hub connections), `start`, `stop`, `restart`, `reset-failed`, `log NAME [-f]
//! [-n N]`, `poweroff`, `reboot`. Every command takes `--json`. Only root may change
//! anything; `ls` and `log` also work for the group `[control] read_group` names, through
//! init's read-only socket (used by itself when the root-only one is out of reach).
//! The protocol: docs/init.md, "Control socket".

mod conn;
mod log;
mod ls;

use std::path::PathBuf;
use std::process::ExitCode;

use bulkhead_init::control::{Request, Response};
use clap::{Parser, Subcommand};

/// Operate a Bulkhead host: its VMs and services, their logs, power.
#[derive(Parser)]
#[command(name = "bulkhead-ctl", version, about)]
struct Cli {
    /// Print JSON instead of text (one document; `log -f`: one line per record).
    #[arg(long, global = true)]
    json: bool,
    /// Init's control socket (default: the root-only one, else, for `ls` and `log`, the
    /// read-only one).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// The hub's control socket, asked for each VM's connections (default: the one init
    /// names).
    #[arg(long, global = true)]
    hub_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every service and VM: state, pid, uid, uptime, restarts, last exit, memory,
    /// hub connections.
    Ls,
    /// Start a service or VM that is not running (a pending restart happens now).
    Start {
        /// Its name in system.toml.
        name: String,
    },
    /// Stop one: SIGTERM to its process group (a VM's guest gets its ACPI power button),
    /// SIGKILL after its stop timeout. It stays stopped.
    Stop {
        /// Its name in system.toml.
        name: String,
    },
    /// Stop, then start again.
    Restart {
        /// Its name in system.toml.
        name: String,
    },
    /// Forget its start history (start limit, backoff); a failed one starts again.
    ResetFailed {
        /// Its name in system.toml.
        name: String,
    },
    /// Its output (a VM's: its console) from init's ring, with timestamps.
    Log {
        /// Its name in system.toml.
        name: String,
        /// Keep printing new lines as they come.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines (default: every line kept).
        #[arg(short = 'n', long)]
        lines: Option<u32>,
    },
    /// Power the host off (every VM gets its power button at once).
    Poweroff,
    /// Reboot the host.
    Reboot,
}

/// What went wrong, for the exit status and the message.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("{0}")]
    Client(#[from] bulkhead_init::control::ClientError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected answer from init: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Other(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": e.to_string() }));
            }
            eprintln!("bulkhead-ctl: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> Result<(), CtlError> {
    let read_only = matches!(cli.command, Cmd::Ls | Cmd::Log { .. });
    let client = conn::connect(cli.socket.as_deref(), read_only)?;
    match &cli.command {
        Cmd::Ls => ls::run(&client, cli.json, cli.hub_socket.as_deref()),
        Cmd::Log {
            name,
            follow,
            lines,
        } => log::run(&client, name, *lines, *follow, cli.json),
        Cmd::Start { name } => act(&client, Request::Start(name.clone()), cli.json),
        Cmd::Stop { name } => act(&client, Request::Stop(name.clone()), cli.json),
        Cmd::Restart { name } => act(&client, Request::Restart(name.clone()), cli.json),
        Cmd::ResetFailed { name } => act(&client, Request::ResetFailed(name.clone()), cli.json),
        Cmd::Poweroff => act(&client, Request::Poweroff, cli.json),
        Cmd::Reboot => act(&client, Request::Reboot, cli.json),
    }
}

/// A request that changes something: prints what init did.
fn act(client: &conn::Conn, req: Request, json: bool) -> Result<(), CtlError> {
    let what = match client.call(&req)? {
        Response::Done(d) => d,
        Response::Ok => match req {
            Request::Poweroff => "powering off".to_string(),
            Request::Reboot => "rebooting".to_string(),
            _ => "done".to_string(),
        },
        Response::Error(e) => return Err(CtlError::Refused(e)),
        other => return Err(CtlError::Unexpected(format!("{other:?}"))),
    };
    if json {
        println!("{}", serde_json::json!({ "ok": true, "done": what }));
    } else {
        println!("{what}");
    }
    Ok(())
}
