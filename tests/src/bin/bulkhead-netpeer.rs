//! The test peer of the net VM's systems, a host service on the emulated host: it moves the
//! peer NIC (a second NIC on the same closed QEMU hub as net-vm's, `QemuConfig::net_hub`)
//! into a network namespace of its own, serves one HTTP page, counts ICMP echo requests and
//! every frame by source MAC, and measures TCP round trips and throughput for the benchmark.
//! A scenario then drives the system and reads the verdicts from what it saw on the wire:
//!
//! - `e2e` (tests/systems/net): an app VM's page fetch served while a flood came from
//!   another VM, the flood's end, net-vm's VMM killed (init restarts it), a fetch after the
//!   restart, the hub's audit log of the VM without a grant, the frame totals, power-off.
//! - `bench` (rootfs/examples/netvm, `bulkhead-rootfs bench net`): waits for the
//!   measurements of the labels it is given, then powers off.
//!
//! Everything it prints, init relays as `<service>: <line>`.

use std::net::{Ipv4Addr, TcpListener};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[path = "netpeer/audit.rs"]
mod audit;
#[path = "netpeer/netns.rs"]
mod netns;
#[path = "netpeer/servers.rs"]
mod servers;

use servers::{mac_text, parse_mac, Mac, Shared};

#[derive(Debug, Parser)]
#[command(name = "bulkhead-netpeer", version)]
struct Cli {
    /// The peer NIC's PCI function.
    #[arg(long, default_value = "0000:00:12.0")]
    pci: String,
    /// An interface by name instead of a PCI function's (a veth end, to try it out on a
    /// build machine inside `unshare --net`).
    #[arg(long)]
    iface: Option<String>,
    /// The peer's address (CIDR).
    #[arg(long, default_value = "198.51.100.1/24")]
    address: String,
    /// The HTTP port.
    #[arg(long, default_value_t = 80)]
    http_port: u16,
    /// The benchmark's measurement port.
    #[arg(long, default_value_t = 9000)]
    measure_port: u16,
    /// A source sending at least this many frames in a second is printed as a flood.
    #[arg(long, default_value_t = 200)]
    flood_rate: u64,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Serve until killed.
    Serve,
    /// The end-to-end scenario of tests/systems/net.
    E2e {
        /// The app VM that fetches and pings.
        #[arg(long)]
        app_ip: Ipv4Addr,
        /// The MAC of the VM that floods.
        #[arg(long)]
        flood_mac: String,
        /// The service to SIGKILL (net-vm's VMM).
        #[arg(long)]
        kill: String,
        /// The flooding VM's service: the kill waits until it has ended (so netd reports
        /// its counters first).
        #[arg(long)]
        flood_service: String,
        /// The VM without a grant: the audit log is read once it has ended.
        #[arg(long)]
        audit_vm: String,
        /// The policy tool that prints the audit log.
        #[arg(long, default_value = "/bin/policyctl")]
        policyctl: String,
        /// Longest wait for each step, in seconds.
        #[arg(long, default_value_t = 900)]
        step_timeout: u64,
    },
    /// Wait for one measurement of each label (taken in this order), then power off.
    Bench {
        #[arg(long = "label", required = true)]
        labels: Vec<String>,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 1500)]
        timeout: u64,
    },
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or(format!("{s:?}: want ADDR/PREFIX"))?;
    let a: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let p: u8 = p.parse().map_err(|e| format!("{p}: {e}"))?;
    if p > 32 {
        return Err(format!("{s:?}: prefix over 32"));
    }
    Ok((a, p))
}

fn random_token() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Polls `check` every 200 ms for up to `timeout`.
fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn control(
    req: &bulkhead_init::control::Request,
) -> Result<bulkhead_init::control::Response, String> {
    bulkhead_init::control::request(
        std::path::Path::new(bulkhead_init::control::SOCKET_PATH),
        req,
    )
    .map_err(|e| e.to_string())
}

/// Does init's service `service` run again, with another pid than `old`?
fn service_restarted(service: &str, old: i32) -> bool {
    use bulkhead_init::control::{Request, Response};
    match control(&Request::Status) {
        Ok(Response::Status { services }) => services
            .iter()
            .any(|s| s.name == service && s.pid.is_some_and(|p| p != old)),
        _ => false,
    }
}

/// Has init's service `service` no running process (it ran and ended)?
fn service_ended(service: &str) -> bool {
    use bulkhead_init::control::{Request, Response};
    match control(&Request::Status) {
        Ok(Response::Status { services }) => services
            .iter()
            .any(|s| s.name == service && s.pid.is_none() && s.starts > 0),
        _ => false,
    }
}

fn poweroff() {
    println!("powering off");
    if let Err(e) = control(&bulkhead_init::control::Request::Poweroff) {
        println!("FAIL: power-off: {e}");
    }
}

/// The fetch from `app` that was served while `flood` sent frames in the second before
/// (or of) it and in the second after it: (its time, flood frames around it).
fn fetch_during_flood(shared: &Shared, app: Ipv4Addr, flood: &Mac) -> Option<(f64, u64)> {
    let now = shared.start.elapsed().as_secs() as usize;
    let ev = shared.lock();
    ev.served.iter().filter(|s| s.from == app).find_map(|s| {
        let sec = s.at.as_secs() as usize;
        if sec + 2 > now {
            return None;
        }
        let before =
            ev.frames_in_second(flood, sec.saturating_sub(1)) + ev.frames_in_second(flood, sec);
        let after = ev.frames_in_second(flood, sec + 1);
        (before > 0 && after > 0).then_some((s.at.as_secs_f64(), before + after))
    })
}

fn e2e(
    shared: &Shared,
    app: Ipv4Addr,
    flood: Mac,
    kill: &str,
    flood_service: &str,
    audit_vm: &str,
    step: Duration,
) -> Result<(), String> {
    let (at, n) = wait_for(step, || fetch_during_flood(shared, app, &flood)).ok_or(format!(
        "no page served to {app} while {} flooded",
        mac_text(&flood)
    ))?;
    shared
        .stop_flood
        .store(true, std::sync::atomic::Ordering::SeqCst);
    println!(
        "served {app} during the flood: at {at:.1} s, {n} flood frames from {} in the seconds around it",
        mac_text(&flood)
    );
    let echoes = wait_for(step, || {
        shared.lock().echoes.get(&app).copied().filter(|n| *n > 0)
    })
    .ok_or(format!("no echo request from {app}"))?;
    println!("echo requests from {app}: {echoes}");
    // The flooding guest asks `/flood` between its rounds and now stops (its loop is bounded
    // too); net-vm is killed after that, so its netd reports the flooder's counters when
    // that VM leaves.
    let quiet = wait_for(step, || {
        let now = shared.start.elapsed().as_secs() as usize;
        let ev = shared.lock();
        let (total, per) = ev.frames.get(&flood)?;
        let last = per.iter().rposition(|n| *n > 0)?;
        (now >= last + 5).then_some(*total)
    })
    .ok_or(format!("the flood from {} did not end", mac_text(&flood)))?;
    println!(
        "the flood from {} ended: {quiet} frames reached the peer",
        mac_text(&flood)
    );
    // Let the flooding VM power off and net-vm's netd report it.
    wait_for(step, || service_ended(flood_service).then_some(()))
        .ok_or(format!("{flood_service} did not end after its flood"))?;
    println!("{flood_service} has ended");
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = shared.start.elapsed();
    let pid = bulkhead_init::control::kill_service(kill)?;
    println!("killed {kill} (pid {pid})");
    // Only a page served once init has started net-vm again counts (one in flight at the
    // kill does not).
    wait_for(step, || service_restarted(kill, pid).then_some(()))
        .ok_or(format!("init did not start {kill} again"))?;
    let restarted_at = shared.start.elapsed();
    println!("{kill} runs again");
    let again = wait_for(step, || {
        shared
            .lock()
            .served
            .iter()
            .find(|s| s.from == app && s.at > restarted_at)
            .map(|s| s.at.as_secs_f64())
    })
    .ok_or(format!("no page served to {app} after {kill} was killed"))?;
    println!(
        "served {app} after {kill}'s restart: at {again:.1} s, {:.1} s after the kill",
        again - killed_at.as_secs_f64()
    );
    // The VM without a grant has its own checks to finish before the audit log is read.
    wait_for(step, || service_ended(audit_vm).then_some(()))
        .ok_or(format!("{audit_vm} did not end"))?;
    println!("{audit_vm} has ended");
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    let (addr, prefix) = parse_cidr(&cli.address)?;
    // Before any thread: the namespace is the calling thread's, and threads inherit it.
    let nic = match &cli.iface {
        Some(n) => netns::Nic::Name(n.clone()),
        None => netns::Nic::Pci(cli.pci.clone()),
    };
    let (iface, mac) = netns::enter_with_nic(&nic, addr, prefix)?;
    let own = parse_mac(&mac)?;
    println!(
        "{iface} ({}{}) is {addr}/{prefix} in a network namespace of its own",
        if cli.iface.is_some() {
            String::new()
        } else {
            format!("{}, ", cli.pci)
        },
        mac_text(&own)
    );
    let token = random_token();
    let shared = Shared::new(format!("bulkhead peer page {token}"));
    println!("the page says: {}", shared.page);
    let http = TcpListener::bind((Ipv4Addr::UNSPECIFIED, cli.http_port))
        .map_err(|e| format!("port {}: {e}", cli.http_port))?;
    let meas = TcpListener::bind((Ipv4Addr::UNSPECIFIED, cli.measure_port))
        .map_err(|e| format!("port {}: {e}", cli.measure_port))?;
    let icmp = servers::raw_socket(libc::AF_INET, libc::IPPROTO_ICMP)?;
    let frames = servers::raw_socket(libc::AF_PACKET, i32::from((libc::ETH_P_ALL as u16).to_be()))?;
    {
        let s = shared.clone();
        std::thread::spawn(move || servers::http(http, s));
        let s = shared.clone();
        let order = match &cli.scenario {
            Scenario::Bench { labels, .. } => labels.clone(),
            _ => Vec::new(),
        };
        std::thread::spawn(move || servers::measure(meas, s, order));
        let s = shared.clone();
        std::thread::spawn(move || servers::icmp(icmp, s));
        let s = shared.clone();
        std::thread::spawn(move || servers::frames(frames, own, s));
        let s = shared.clone();
        let rate = cli.flood_rate;
        std::thread::spawn(move || servers::rates(s, rate));
    }
    println!(
        "serving HTTP on {}, measurements on {}",
        cli.http_port, cli.measure_port
    );
    match cli.scenario {
        Scenario::Serve => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        Scenario::E2e {
            app_ip,
            flood_mac,
            kill,
            flood_service,
            audit_vm,
            policyctl,
            step_timeout,
        } => {
            let flood = parse_mac(&flood_mac)?;
            let r = e2e(
                &shared,
                app_ip,
                flood,
                &kill,
                &flood_service,
                &audit_vm,
                Duration::from_secs(step_timeout),
            );
            if let Err(e) = &r {
                println!("FAIL: {e}");
            }
            // The hub's denied records of every VM, read by policyctl on the host: the
            // first of each VM and kind verbatim, then a count (a line per record was a
            // burst the console dropped lines of; `netpeer/audit.rs`).
            match Command::new(&policyctl).args(["log", "--denied"]).output() {
                Ok(o) if o.status.success() => {
                    for l in audit::lines(&String::from_utf8_lossy(&o.stdout)) {
                        println!("{l}");
                    }
                }
                Ok(o) => println!(
                    "policyctl log ended with {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => println!("policyctl log: {e}"),
            }
            for (mac, (total, _)) in &shared.lock().frames {
                println!("frames from {}: {total}", mac_text(mac));
            }
            poweroff();
            r
        }
        Scenario::Bench { labels, timeout } => {
            let done = wait_for(Duration::from_secs(timeout), || {
                let ev = shared.lock();
                labels
                    .iter()
                    .all(|l| ev.measured.iter().any(|m| &m.label == l))
                    .then_some(())
            });
            if done.is_none() {
                println!("FAIL: not every measurement came ({})", labels.join(", "));
            }
            poweroff();
            done.ok_or_else(|| "measurements missing".to_string())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
