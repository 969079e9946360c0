//! The example system's first VM program: reports what the VM looks like from inside (kernel,
//! CPUs, memory, PCI devices, entropy from virtio-rng) and exits, so the VM powers off.

use std::io::Read;
use std::process::ExitCode;

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn pci_devices() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/sys/bus/pci/devices") {
        for e in rd.flatten() {
            let p = e.path();
            let id = |f: &str| first_line(&p.join(f).to_string_lossy());
            let driver = std::fs::read_link(p.join("driver"))
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "-".into());
            out.push(format!(
                "{} {}:{} {}",
                e.file_name().to_string_lossy(),
                id("vendor").trim_start_matches("0x"),
                id("device").trim_start_matches("0x"),
                driver
            ));
        }
    }
    out.sort();
    out
}

/// Asks `target` (`service@vm`, reached through the hub) for `n!`, retrying while the
/// provider is still booting. Returns the answer.
fn ask(target: &str, n: &str) -> Result<String, String> {
    let wl = bulkhead_wl::Wl::open().map_err(|e| format!("open /dev/wl0: {e}"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    let conn = loop {
        match wl.connect(target) {
            Ok(c) => break c,
            // The hub's answer is the same whether the provider is not up yet or we may
            // not connect: keep asking for a while.
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_secs(2))
            }
            Err(e) => return Err(format!("connect {target}: {e}")),
        }
    };
    conn.send(n.as_bytes(), &[])
        .map_err(|e| format!("send to {target}: {e}"))?;
    let (data, _) = conn
        .recv()
        .map_err(|e| format!("recv from {target}: {e}"))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

fn main() -> ExitCode {
    let uts = nix::sys::utsname::uname();
    let release = uts
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    println!("hello from inside a Bulkhead VM: Linux {release}");
    println!(
        "cpus online: {}",
        first_line("/sys/devices/system/cpu/online")
    );
    println!("memory: {}", first_line("/proc/meminfo"));
    for d in pci_devices() {
        println!("pci {d}");
    }
    let mut buf = [0u8; 8];
    match std::fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut buf)) {
        Ok(()) => println!(
            "8 random bytes from virtio-rng: {}",
            buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        Err(e) => {
            println!("no virtio-rng: {e}");
            return ExitCode::from(1);
        }
    }
    // `bulkhead-hello --ask factorial@edu-vm 10`: use another VM's service through the hub.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, target, n] = args.as_slice() {
        if flag == "--ask" {
            match ask(target, n) {
                Ok(answer) => println!("{target} answered: {answer}"),
                Err(e) => {
                    println!("asking {target}: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    ExitCode::SUCCESS
}
