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
    ExitCode::SUCCESS
}
