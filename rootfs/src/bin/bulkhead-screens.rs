//! `bulkhead-screens`: a host service of a Bulkhead system with a GUI VM. It listens on a
//! Unix socket that the GUI VM's VMM names as a virtio_wl socket (`--wl-socket
//! screens=PATH`), takes the screenshot frames the GUI VM's agent sends (checked with
//! `bulkhead_desktop::frame`, never interpreted), and writes each one unchanged to a serial
//! port (the emulated host's second one, a file on the build machine) for the build machine
//! to decode. After a picture has been passed on it can run commands named for it
//! (`--run-after NAME=COMMAND ARGS`): the example system grants a VM its window, or powers
//! off, once a picture exists.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;

use bulkhead_desktop::frame::{Decoder, Kind};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bulkhead-screens",
    about = "Pass the GUI VM's screenshots on to a serial port, and run commands after them"
)]
struct Cli {
    /// The socket to listen on (its directory is created).
    #[arg(
        long,
        required_unless_present = "socket_fd",
        conflicts_with = "socket_fd"
    )]
    socket: Option<PathBuf>,
    /// An inherited, already-connected stream socket to serve instead (one end of a
    /// socketpair init made; the other end is the jailed GUI VMM's `--wl-socket-fd`).
    #[arg(long)]
    socket_fd: Option<i32>,
    /// Where frames go (a serial port is put in raw mode).
    #[arg(long)]
    serial: PathBuf,
    /// `NAME=COMMAND ARGS…`: once picture NAME has been passed on, run the command (split
    /// at spaces); several for one name run in order.
    #[arg(long = "run-after", value_name = "NAME=COMMAND")]
    run_after: Vec<String>,
    /// `NAME=SERVICE`: fault injection for tests: once picture NAME has been passed on, and
    /// before its `--run-after` commands, SIGKILL the service's process (a VM's VMM), found
    /// through init's control socket.
    #[arg(long = "kill-after", value_name = "NAME=SERVICE")]
    kill_after: Vec<String>,
}

fn raw_mode(f: &std::fs::File) {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    if let Ok(mut t) = tcgetattr(f) {
        cfmakeraw(&mut t);
        if let Err(e) = tcsetattr(f, SetArg::TCSANOW, &t) {
            eprintln!("warning: raw mode: {e}");
        }
    }
}

fn run_hooks(hooks: &[(String, Vec<String>)], name: &str) {
    for (_, argv) in hooks.iter().filter(|(n, _)| n == name) {
        let Some((prog, args)) = argv.split_first() else {
            continue;
        };
        println!("after {name}: running {}", argv.join(" "));
        match Command::new(prog).args(args).status() {
            Ok(s) if s.success() => {}
            Ok(s) => println!("after {name}: {prog} ended with {s}"),
            Err(e) => println!("after {name}: {prog}: {e}"),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let mut hooks = Vec::new();
    for h in &cli.run_after {
        let Some((name, cmd)) = h.split_once('=') else {
            eprintln!("error: --run-after {h:?}: NAME=COMMAND");
            std::process::exit(2);
        };
        let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        if argv.is_empty() {
            eprintln!("error: --run-after {h:?}: no command");
            std::process::exit(2);
        }
        hooks.push((name.to_string(), argv));
    }
    let mut kills = Vec::new();
    for k in &cli.kill_after {
        let Some((name, service)) = k.split_once('=') else {
            eprintln!("error: --kill-after {k:?}: NAME=SERVICE");
            std::process::exit(2);
        };
        kills.push((name.to_string(), service.to_string()));
    }
    let serial = match std::fs::OpenOptions::new().write(true).open(&cli.serial) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {}: {e}", cli.serial.display());
            std::process::exit(1);
        }
    };
    raw_mode(&serial);
    let mut ctx = Ctx {
        serial,
        hooks,
        kills,
    };
    if let Some(fd) = cli.socket_fd {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            eprintln!("error: --socket-fd {fd}: not an open descriptor");
            std::process::exit(2);
        }
        // SAFETY: init handed this descriptor to us for this one use; nothing else in the
        // process refers to it.
        let conn = UnixStream::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
        println!("serving the handed-over socket (fd {fd})");
        ctx.serve(conn, &cli.serial);
        return;
    }
    let Some(socket) = cli.socket.clone() else {
        eprintln!("error: --socket or --socket-fd");
        std::process::exit(2);
    };
    if let Some(dir) = socket.parent() {
        let _ = std::fs::create_dir_all(dir);
        // VMMs run as their own users: they need to reach the socket.
        let _ = std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
    }
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {}: {e}", socket.display());
            std::process::exit(1);
        }
    };
    let _ = std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666));
    println!("listening on {}", socket.display());
    for conn in listener.incoming() {
        match conn {
            Ok(c) => ctx.serve(c, &cli.serial),
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

/// Where frames go and what runs after them.
struct Ctx {
    serial: std::fs::File,
    hooks: Vec<(String, Vec<String>)>,
    kills: Vec<(String, String)>,
}

impl Ctx {
    /// Passes on the frames of one connection until it ends or breaks the framing.
    fn serve(&mut self, mut conn: UnixStream, serial_path: &std::path::Path) {
        let (serial, hooks, kills) = (&mut self.serial, &self.hooks, &self.kills);
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    eprintln!("read: {e}");
                    break;
                }
            };
            let frames = match dec.feed(buf.get(..n).unwrap_or_default()) {
                Ok(f) => f,
                Err(e) => {
                    println!("refused the rest of this connection: {e}");
                    break;
                }
            };
            for f in frames {
                let bytes = f.encode();
                let written = serial.write_all(&bytes).and_then(|()| serial.flush());
                let drained = nix::sys::termios::tcdrain(&serial);
                match (written, drained) {
                    (Ok(()), _) => println!(
                        "passed on {} {} ({} bytes)",
                        f.kind.as_str(),
                        f.name,
                        f.body.len()
                    ),
                    (Err(e), _) => println!("{}: {e}", serial_path.display()),
                }
                if f.kind == Kind::Png {
                    for (_, service) in kills.iter().filter(|(n, _)| *n == f.name) {
                        match bulkhead_init::control::kill_service(service) {
                            Ok(pid) => println!(
                                "after {}: killed {service} (pid {pid}) with SIGKILL",
                                f.name
                            ),
                            Err(e) => println!("after {}: cannot kill {service}: {e}", f.name),
                        }
                    }
                    run_hooks(hooks, &f.name);
                }
            }
        }
    }
}
