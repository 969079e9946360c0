//! Operating a host, from inside it:
//!
//! - `ops-tick` (in a guest): prints `tick N` every 500 ms, forever; with `ops.stubborn=1`
//!   on the guest's command line it ignores SIGTERM, so its guest does not power off when
//!   its power button is pressed (the guest's init waits for it longer than the host's stop
//!   timeout) and the host's init must SIGKILL the VMM.
//! - `ops-drive CTL` (as root on the emulated host): drives `bulkhead-ctl` (the real binary,
//!   with `--json`) through the scenario of tests/tests/ops_e2e.rs and prints each step;
//!   any surprise is a `FAIL:` line and exit status 1. Its PASS line comes before it asks
//!   for the power-off (init stops it with everything else). The test reads init's own
//!   lines and the persistent log disk for its verdicts; these lines say which step the
//!   driver is at.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Res = Result<String, String>;

/// The VMs of the ops system: vm-a powers off when asked, the others do not.
const VMS: [&str; 4] = ["vm-a", "vm-b", "vm-c", "vm-d"];
/// Operators' group and a member's uid (`[control] read_group`).
const GROUP: u32 = 1500;
const MEMBER: u32 = 1600;
/// Everything under nested emulation is slow: generous, only a safety net.
const LONG: Duration = Duration::from_secs(900);

pub fn tick() -> std::process::ExitCode {
    let stubborn = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.split_whitespace().any(|w| w == "ops.stubborn=1"))
        .unwrap_or(false);
    if stubborn {
        // SAFETY: SIG_IGN is a valid disposition; no handler code runs.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    println!("ops: ticking (stubborn: {stubborn})");
    let mut n = 0u64;
    loop {
        n += 1;
        println!("tick {n}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The program name the guest's init puts before each of the ticker's lines
/// (`tests/systems/ops/guests/tick/guest.toml`): a VM's log holds the guest's console,
/// `tick: tick 7`, not the program's bare `tick 7`.
const TICK_LINE: &str = "tick: tick ";

/// The tick number of one `bulkhead-ctl log --json` record of a VM, if it is a line of the
/// guest's ticker (never one of init's own lines about the service).
fn tick_of_record(v: &serde_json::Value) -> Option<u64> {
    if v["from_init"] == true {
        return None;
    }
    v["text"]
        .as_str()
        .and_then(|t| t.strip_prefix(TICK_LINE))
        .and_then(|n| n.trim().parse().ok())
}

fn say(msg: &str) {
    println!("ops: {msg}");
}

struct Ctl {
    path: String,
}

impl Ctl {
    /// Runs bulkhead-ctl; (exit code, stdout, stderr).
    fn run(&self, args: &[&str], as_member: bool) -> (i32, String, String) {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&self.path);
        cmd.args(args);
        if as_member {
            cmd.uid(MEMBER).gid(GROUP);
        }
        match cmd.output() {
            Ok(o) => (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => (-1, String::new(), e.to_string()),
        }
    }

    fn ok(&self, args: &[&str]) -> Result<String, String> {
        let (code, out, err) = self.run(args, false);
        if code != 0 {
            return Err(format!(
                "bulkhead-ctl {}: exit {code}: {err}",
                args.join(" ")
            ));
        }
        Ok(out)
    }

    fn ls(&self) -> Result<serde_json::Value, String> {
        let out = self.ok(&["ls", "--json"])?;
        serde_json::from_str(&out).map_err(|e| format!("ls --json: {e}: {out}"))
    }

    fn entry(&self, name: &str) -> Result<serde_json::Value, String> {
        let l = self.ls()?;
        l["services"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name).cloned())
            .ok_or_else(|| format!("{name} not in ls: {l}"))
    }

    /// Waits until `pred` holds for `name`'s entry; returns it.
    fn wait(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, String> {
        let end = Instant::now() + LONG;
        let mut progress = Progress::new();
        loop {
            let e = self.entry(name)?;
            if pred(&e) {
                return Ok(e);
            }
            if Instant::now() > end {
                return Err(format!("{name} never {what}: {e}"));
            }
            if let Some(secs) = progress.due() {
                say(&format!(
                    "still waiting after {secs} s: {name} {what}; ls: {e}"
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn state(&self, name: &str, state: &str) -> Result<serde_json::Value, String> {
        self.wait(name, state, |e| e["state"] == state)
    }

    /// The tick numbers `name`'s guest printed in its current run (after init's last
    /// `started` line in its log), and the newest tick in the log.
    fn ticks(&self, name: &str) -> Result<(Vec<u64>, u64), String> {
        let out = self.ok(&["log", name, "-n", "400", "--json"])?;
        let lines: Vec<serde_json::Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let tick = tick_of_record;
        let newest = lines.iter().rev().find_map(tick).unwrap_or(0);
        let start = lines
            .iter()
            .rposition(|v| {
                v["from_init"] == true
                    && v["text"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("started pid"))
            })
            .map_or(0, |i| i + 1);
        Ok((lines.iter().skip(start).filter_map(tick).collect(), newest))
    }

    /// The newest tick number in `name`'s log (0 if none yet).
    fn last_tick(&self, name: &str) -> Result<u64, String> {
        Ok(self.ticks(name)?.1)
    }

    /// Waits until `name`'s guest ticks in its current run.
    fn ticking(&self, name: &str) -> Result<(), String> {
        let end = Instant::now() + LONG;
        let mut progress = Progress::new();
        while self.ticks(name)?.0.len() < 2 {
            if Instant::now() > end {
                return Err(format!(
                    "{name}'s guest never ticked in its current run; its log ends: {}",
                    self.last_line(name)?
                ));
            }
            if let Some(secs) = progress.due() {
                say(&format!(
                    "still waiting after {secs} s: {name}'s guest to tick; its log ends: {}",
                    self.last_line(name)?
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }

    /// The last line of `name`'s log as `bulkhead-ctl log` prints it.
    fn last_line(&self, name: &str) -> Result<String, String> {
        Ok(self.ok(&["log", name, "-n", "1"])?.trim().to_string())
    }

    fn pid(&self, name: &str) -> Result<i64, String> {
        self.entry(name)?["pid"]
            .as_i64()
            .ok_or_else(|| format!("{name} has no pid"))
    }
}

/// When a wait is slow, says so once a minute (what it waits for and what it sees), so a
/// stuck run shows where it is stuck on the console instead of only at the step's end.
struct Progress {
    start: Instant,
    next: Duration,
}

impl Progress {
    const EVERY: Duration = Duration::from_secs(60);

    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            next: Self::EVERY,
        }
    }

    /// The seconds waited so far, once each [`Self::EVERY`].
    fn due(&mut self) -> Option<u64> {
        let waited = self.start.elapsed();
        if waited < self.next {
            return None;
        }
        self.next = waited + Self::EVERY;
        Some(waited.as_secs())
    }
}

fn running_with_new_pid(ctl: &Ctl, name: &str, old: i64) -> Result<i64, String> {
    let e = ctl.wait(name, "running again", |e| {
        e["state"] == "running" && e["pid"].as_i64().is_some_and(|p| p != old)
    })?;
    e["pid"].as_i64().ok_or_else(|| "no pid".into())
}

pub fn drive(ctl_path: &str) -> Res {
    let ctl = Ctl {
        path: ctl_path.to_string(),
    };
    // 1. Everything up.
    ctl.state("hub", "running")?;
    for vm in VMS {
        ctl.state(vm, "running")?;
        ctl.ticking(vm)?;
    }
    say("step up: every VM runs and ticks");
    let l = ctl.ls()?;
    for vm in VMS {
        let e = l["services"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == vm).cloned())
            .unwrap_or_default();
        if e["memory_bytes"].as_u64().unwrap_or(0) == 0 || e["hub_connections"].is_null() {
            return Err(format!(
                "ls shows no memory or hub connections for {vm}: {e}"
            ));
        }
        if e["kind"] != "vm" || e["uid"].is_null() || e["uptime_ms"].is_null() {
            return Err(format!("ls entry of {vm} is incomplete: {e}"));
        }
    }
    for line in ctl.ok(&["ls"])?.lines() {
        say(&format!("ls: {line}"));
    }

    // 2. Another uid: reads through the group's socket, changes nothing.
    let (code, _, err) = ctl.run(&["stop", "vm-b"], true);
    if code == 0 || !err.contains("permission denied") {
        return Err(format!("a non-root stop was not refused: {code} {err}"));
    }
    say(&format!("step non-root: stop refused: {}", err.trim()));
    let (code, _, err) = ctl.run(
        &["--socket", "/run/bulkhead-read/init.sock", "stop", "vm-b"],
        true,
    );
    if code == 0 || !err.contains("read-only") {
        return Err(format!("the read-only socket took a stop: {code} {err}"));
    }
    let (code, out, err) = ctl.run(&["ls"], true);
    if code != 0 || !out.contains("vm-b") {
        return Err(format!("the operators' group cannot ls: {code} {err}"));
    }
    say("step non-root: ls through the group's socket works, stop is refused");
    if ctl.entry("vm-b")?["state"] != "running" {
        return Err("vm-b stopped after a refused stop".into());
    }

    // 3. log -f shows vm-b's new console lines.
    let before = ctl.last_tick("vm-b")?;
    let mut f = Command::new(&ctl.path)
        .args(["log", "vm-b", "-f", "-n", "0", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("log -f: {e}"))?;
    let out = f.stdout.take().ok_or("log -f: no stdout")?;
    let mut newer = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.map_err(|e| format!("log -f: {e}"))?;
        let record = serde_json::from_str(&line).unwrap_or_default();
        if let Some(n) = tick_of_record(&record) {
            if n <= before {
                let _ = f.kill();
                return Err(format!("log -f -n 0 printed an old line: {line}"));
            }
            newer.push(record["text"].as_str().unwrap_or_default().to_string());
            if newer.len() == 3 {
                break;
            }
        }
    }
    let _ = f.kill();
    let _ = f.wait();
    if newer.len() < 3 {
        return Err(format!("log -f ended early: {newer:?}"));
    }
    say(&format!(
        "step log-follow: new vm-b lines after tick {before}: {}",
        newer.join(" | ")
    ));

    // 4. stop, start, restart vm-a while vm-b keeps running.
    let b = ctl.pid("vm-b")?;
    let a = ctl.pid("vm-a")?;
    ctl.ok(&["stop", "vm-a"])?;
    ctl.state("vm-a", "stopped")?;
    say("step stop: vm-a stopped");
    ctl.ok(&["start", "vm-a"])?;
    let a2 = running_with_new_pid(&ctl, "vm-a", a)?;
    ctl.ticking("vm-a")?;
    say("step start: vm-a runs again");
    ctl.ok(&["restart", "vm-a"])?;
    running_with_new_pid(&ctl, "vm-a", a2)?;
    ctl.ticking("vm-a")?;
    say("step restart: vm-a restarted");
    if ctl.pid("vm-b")? != b || ctl.entry("vm-b")?["state"] != "running" {
        return Err("vm-b did not keep running while vm-a was operated".into());
    }
    say("step beside: vm-b kept running (same pid)");

    // 5. The hub killed on purpose: it restarts, and every VM is restarted to register
    // with it again.
    let pids: Vec<i64> = VMS.iter().map(|v| ctl.pid(v)).collect::<Result<_, _>>()?;
    let hub = ctl.pid("hub")?;
    say(&format!("step hub-kill: SIGKILL to the hub (pid {hub})"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hub as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill hub: {e}"))?;
    running_with_new_pid(&ctl, "hub", hub)?;
    for (vm, old) in VMS.iter().zip(&pids) {
        running_with_new_pid(&ctl, vm, *old)?;
        ctl.ticking(vm)?;
    }
    say("step hub-restart: the hub and every VM run again, each VM restarted");

    // 6. The hub killed again: past its start limit (burst = 2): failed, VMs held.
    let hub = ctl.pid("hub")?;
    say(&format!(
        "step hub-fail: SIGKILL to the hub again (pid {hub})"
    ));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hub as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill hub: {e}"))?;
    ctl.state("hub", "failed")?;
    for vm in VMS {
        ctl.state(vm, "held")?;
    }
    say("step held: the hub failed and every VM is held");

    // 7. reset-failed brings the hub back, and the held VMs with it.
    ctl.ok(&["reset-failed", "hub"])?;
    ctl.state("hub", "running")?;
    for vm in VMS {
        ctl.state(vm, "running")?;
        ctl.ticking(vm)?;
    }
    say("step revived: reset-failed hub; the hub and every VM run again");

    Ok("ops-drive PASS: every step done; powering off".into())
}

/// The scenario's last step: power off (every VM's power button at once). Init stops this
/// service with the rest, so the caller prints the verdict before this.
pub fn power_off(ctl_path: &str) -> Result<(), String> {
    let ctl = Ctl {
        path: ctl_path.to_string(),
    };
    ctl.ok(&["poweroff"]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_is_read_from_the_guests_console_line_in_a_vms_log() {
        // A record as `bulkhead-ctl log vm-b --json` prints it: the guest's console line as
        // the VM's log holds it (seen on the ops system's log disk: `tick: tick 873`).
        let record = |from_init: bool, text: &str| {
            let line = bulkhead_init::ring::LogLine {
                seq: 12,
                boot_ms: 468_458,
                unix_ms: 1_796_609_517_912,
                from_init,
                text: text.into(),
            };
            serde_json::from_str(&serde_json::to_string(&line).unwrap()).unwrap()
        };
        assert_eq!(tick_of_record(&record(false, "tick: tick 873")), Some(873));
        assert_eq!(
            tick_of_record(&record(false, "probe: tick 3")),
            None,
            "another program's line"
        );
        assert_eq!(
            tick_of_record(&record(true, "tick: tick 3")),
            None,
            "init's own line"
        );
    }
}
