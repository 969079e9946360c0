//! `stop-console SERVICE COUNT`: stops the host's console the way ^S does
//! (`tcflow(TCOOFF)` on /dev/console), waits until init has started SERVICE COUNT more
//! times (asking init with `bulkhead-init status` over its control socket), then asks init
//! to power off while the console is still stopped. On SIGTERM (init's stop sequence) it
//! starts the console again (`TCOON`) and exits. An init that blocks on its console never
//! answers, and the host never powers off.

use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, ExitCode};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::termios::{tcflow, FlowArg};

use super::say;

const INIT: &str = "/bin/bulkhead-init";

/// SERVICE's start count from `bulkhead-init status`.
fn starts(service: &str) -> Result<u32, String> {
    let out = Command::new(INIT)
        .arg("status")
        .output()
        .map_err(|e| format!("{INIT} status: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{INIT} status: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // NAME STATE PID STARTS LAST EXIT
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&service))
        .and_then(|w| w.get(3).and_then(|n| n.parse().ok()))
        .ok_or_else(|| format!("no {service} in the status:\n{text}"))
}

fn flood_then_poweroff(service: &str, more: u32) -> Result<(), String> {
    let first = starts(service)?;
    while starts(service)? < first + more {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let s = Command::new(INIT)
        .arg("poweroff")
        .status()
        .map_err(|e| format!("{INIT} poweroff: {e}"))?;
    if !s.success() {
        return Err(format!("{INIT} poweroff: {s}"));
    }
    Ok(())
}

pub fn stop_console(service: &str, more: u32) -> ExitCode {
    let mut term = SigSet::empty();
    term.add(Signal::SIGTERM);
    if let Err(e) = term.thread_block() {
        say(&format!("FAIL: cannot block SIGTERM: {e}"));
        return ExitCode::from(1);
    }
    let console = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    {
        Ok(f) => f,
        Err(e) => {
            say(&format!("FAIL: /dev/console: {e}"));
            return ExitCode::from(1);
        }
    };
    say("stopping the console (TCOOFF)");
    if let Err(e) = tcflow(&console, FlowArg::TCOOFF) {
        say(&format!("FAIL: tcflow(TCOOFF): {e}"));
        return ExitCode::from(1);
    }
    let flooded = flood_then_poweroff(service, more);
    if flooded.is_ok() {
        // Stay stopped until init's shutdown sends SIGTERM.
        let _ = term.wait();
    }
    let _ = tcflow(&console, FlowArg::TCOON);
    match flooded {
        Ok(()) => {
            say("console running again (TCOON)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("FAIL: {e}"));
            ExitCode::from(1)
        }
    }
}
