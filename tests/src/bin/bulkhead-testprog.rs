//! A small program the end-to-end tests run as a service inside a booted host. It prints
//! what it sees on stdout (init relays it to the console as `<service>: <line>`), and can
//! misbehave on purpose: crash, or ignore SIGTERM.

use std::process::ExitCode;

#[path = "testprog/console.rs"]
mod testprog_console;
#[path = "testprog/hub.rs"]
mod testprog_hub;
#[path = "testprog/jail.rs"]
mod testprog_jail;
#[path = "testprog/ops.rs"]
mod testprog_ops;
#[path = "testprog/screen.rs"]
mod testprog_screen;
#[path = "testprog/wl.rs"]
mod testprog_wl;
#[path = "testprog/wl_faux.rs"]
mod testprog_wl_faux;
use std::time::Duration;

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .and_then(|s| s.parse::<f64>().ok())
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn say(msg: &str) {
    println!("testprog: {msg}");
}

fn report(r: Result<String, String>) -> ExitCode {
    match r {
        Ok(msg) => {
            say(&msg);
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&format!("FAIL: {e}"));
            ExitCode::from(1)
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: bulkhead-testprog crash [CODE] | ignore-term | sleep SECS | exit CODE | \
         stop-console SERVICE COUNT | \
         check-kvm | check-vfio BDF | vm-check | wl-guest | wl-peer PATH | \
         wl-faux-server | wl-faux-client | wl-faux-relay LISTEN SVC CTL | hub-guest | hub-audit PATH VM | ops-tick | ops-drive CTL | run-after MS PROGRAM [ARGS...] | \
         run-when FILE NEEDLE PROGRAM [ARGS...] | screen-draw HOLD_SECS | screen-killer SERVICE"
    );
    ExitCode::from(2)
}

fn check_kvm() -> ExitCode {
    use std::os::fd::AsRawFd;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => {
            say(&format!("/dev/kvm missing: {e}"));
            return ExitCode::from(1);
        }
    };
    // KVM_GET_API_VERSION = _IO(0xAE, 0x00)
    // SAFETY: the fd is open for the call's duration; this ioctl takes no argument.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), 0xAE00, 0) };
    if v < 0 {
        say(&format!(
            "/dev/kvm ioctl failed: {}",
            std::io::Error::last_os_error()
        ));
        return ExitCode::from(1);
    }
    say(&format!("/dev/kvm api {v}"));
    ExitCode::SUCCESS
}

/// Says which kernel runs this program (`kernel <release>`).
fn say_kernel() {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    say(&format!("kernel {release}"));
}

/// Inside a VM: which kernel, how many CPUs, bytes from the virtio-rng, and a marker written to the
/// virtio-blk disk (`/dev/vda`) that the outside reads back after the VM has ended.
fn vm_check() -> ExitCode {
    use std::io::{Read, Seek, SeekFrom, Write};
    say_kernel();
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    say(&format!("cpus online {}", cpus.trim()));
    let mut rng = [0u8; 16];
    match std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut rng)) {
        Ok(()) => say(&format!("hwrng {}", hex(&rng))),
        Err(e) => {
            say(&format!("hwrng failed: {e}"));
            return ExitCode::from(1);
        }
    }
    let marker = format!("BULKHEAD-DISK-MARKER {}\n", hex(&rng));
    let written = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vda")
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(0))?;
            f.write_all(marker.as_bytes())?;
            f.sync_all()?;
            let mut back = vec![0u8; marker.len()];
            f.seek(SeekFrom::Start(0))?;
            f.read_exact(&mut back)?;
            Ok(back == marker.as_bytes())
        });
    match written {
        Ok(true) => {
            say(&format!("disk marker written {}", hex(&rng)));
            // Last: a second marker at 4 KiB says every check above has been printed (the
            // host may stop the VM once it sees it).
            let done = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/vda")
                .and_then(|mut f| {
                    f.seek(SeekFrom::Start(4096))?;
                    f.write_all(b"BULKHEAD-CHECK-DONE\n")?;
                    f.sync_all()
                });
            if let Err(e) = done {
                say(&format!("disk failed: {e}"));
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Ok(false) => {
            say("disk read back differs");
            ExitCode::from(1)
        }
        Err(e) => {
            say(&format!("disk failed: {e}"));
            ExitCode::from(1)
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_vfio(bdf: &str) -> ExitCode {
    let dev = format!("/sys/bus/pci/devices/{bdf}");
    let link = |name: &str| {
        std::fs::read_link(format!("{dev}/{name}"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "none".into())
    };
    let (driver, group) = (link("driver"), link("iommu_group"));
    let node = format!("/dev/vfio/{group}");
    let present = std::path::Path::new(&node).exists();
    say(&format!(
        "{bdf} driver={driver} group={group} {node} {}",
        if present { "present" } else { "absent" }
    ));
    if driver == "vfio-pci" && present {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        return usage();
    };
    match mode.as_str() {
        "crash" => {
            let code = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1u8);
            say(&format!("start uptime_ms={}", uptime_ms()));
            ExitCode::from(code)
        }
        "ignore-term" => {
            // SAFETY: SIG_IGN is a valid disposition; no handler code runs.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            say("ignoring SIGTERM");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "sleep" => {
            let secs = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(3600u64);
            say("sleeping");
            std::thread::sleep(Duration::from_secs(secs));
            ExitCode::SUCCESS
        }
        "forge" => {
            // Prints its arguments verbatim, one line each: what a hostile or confused guest
            // could put on its console (init relays it with this service's name first).
            for line in &args[1..] {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        "exit" => {
            let code = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(0u8);
            say(&format!("exiting with {code}"));
            ExitCode::from(code)
        }
        "stop-console" => match (args.get(1), args.get(2).and_then(|n| n.parse().ok())) {
            (Some(service), Some(more)) => testprog_console::stop_console(service, more),
            _ => usage(),
        },
        "check-kvm" => check_kvm(),
        "vm-check" => vm_check(),
        "wl-guest" => {
            say_kernel();
            report(testprog_wl::guest())
        }
        "wl-peer" => match args.get(1) {
            Some(path) => report(testprog_wl::peer(path)),
            None => usage(),
        },
        "wl-faux-server" => report(testprog_wl_faux::server()),
        "wl-faux-client" => report(testprog_wl_faux::client()),
        "wl-faux-relay" => match (args.get(1), args.get(2), args.get(3)) {
            (Some(listen), Some(svc), Some(ctl)) => {
                report(testprog_wl_faux::relay_main(listen, svc, ctl))
            }
            _ => usage(),
        },
        "screen-draw" => {
            let hold = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            report(testprog_screen::draw(hold))
        }
        "screen-killer" => match args.get(1) {
            Some(service) => report(testprog_screen::killer(service)),
            None => usage(),
        },
        "hub-guest" => report(testprog_hub::guest()),
        "hub-audit" => match (args.get(1), args.get(2)) {
            (Some(path), Some(vm)) => report(testprog_hub::audit(path, vm)),
            _ => usage(),
        },
        "check-vfio" => match args.get(1) {
            Some(bdf) => check_vfio(bdf),
            None => usage(),
        },
        "jail-check" => report(testprog_jail::check(&args[1..])),
        "escape-probe" => report(testprog_jail::probe()),
        "ops-tick" => testprog_ops::tick(),
        "ops-drive" => match args.get(1) {
            // The verdict is printed before the power-off is asked for: init stops this
            // service too (SIGTERM) as soon as it has taken the request, so a line printed
            // after the request may never come.
            Some(ctl) => match testprog_ops::drive(ctl) {
                Ok(verdict) => {
                    say(&verdict);
                    match testprog_ops::power_off(ctl) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e) => report(Err(e)),
                    }
                }
                Err(e) => report(Err(e)),
            },
            None => usage(),
        },
        "run-after" => {
            let (Some(ms), Some(prog)) = (args.get(1).and_then(|m| m.parse().ok()), args.get(2))
            else {
                return usage();
            };
            std::thread::sleep(Duration::from_millis(ms));
            run_program(prog, &args[3..])
        }
        "run-when" => {
            let (Some(file), Some(needle), Some(prog)) = (args.get(1), args.get(2), args.get(3))
            else {
                return usage();
            };
            // Polls the first 64 KiB of FILE (a block device too) until NEEDLE is in it;
            // gives up after 20 minutes.
            let found = (0..6000).any(|_| {
                let mut head = vec![0u8; 64 * 1024];
                let n = std::fs::File::open(file)
                    .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
                    .unwrap_or(0);
                let hit = head[..n]
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes());
                if !hit {
                    std::thread::sleep(Duration::from_millis(200));
                }
                hit
            });
            if !found {
                say(&format!("{needle:?} never appeared in {file}"));
                return ExitCode::from(1);
            }
            say(&format!("{needle:?} is in {file}"));
            run_program(prog, &args[4..])
        }
        _ => usage(),
    }
}

fn run_program(prog: &str, args: &[String]) -> ExitCode {
    say(&format!("running {prog}"));
    match std::process::Command::new(prog).args(args).status() {
        Ok(s) => {
            say(&format!("{prog} ended: {s}"));
            if s.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            say(&format!("{prog} failed to start: {e}"));
            ExitCode::from(1)
        }
    }
}
