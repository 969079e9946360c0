//! The example system's first VM program: reports what the VM looks like from inside (kernel,
//! CPUs, memory, PCI devices, entropy from virtio-rng) and exits, so the VM powers off.

use std::io::Read;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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

/// How long `--ask` waits for the provider: well inside `bulkhead-rootfs boot`'s own
/// timeout (600 s), and several times what the example's edu driver VM needs to offer its
/// service under software emulation (tens of seconds).
const ASK_WAIT: Duration = Duration::from_secs(180);

/// The pause between two connection attempts: growing from 1 s to at most 10 s, so a
/// provider that never comes costs a few dozen refused attempts, not hundreds.
fn retry_pause(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(4)).min(Duration::from_secs(10))
}

/// Asks `target` (`service@vm`, reached through the hub) for `n!`, retrying while the
/// provider is still booting, for at most `ASK_WAIT`. Returns the answer, or one error that
/// says how long it tried and what the hub answered last.
fn ask(target: &str, n: &str) -> Result<String, String> {
    let wl = bulkhead_wl::Wl::open().map_err(|e| format!("open /dev/wl0: {e}"))?;
    let start = Instant::now();
    let mut attempt = 0u32;
    let conn = loop {
        match wl.connect(target) {
            Ok(c) => break c,
            // The hub's answer is the same whether the provider is not up yet or we may
            // not connect: keep asking for a while.
            Err(e) => {
                let pause = retry_pause(attempt);
                attempt += 1;
                if start.elapsed() + pause > ASK_WAIT {
                    return Err(format!(
                        "gave up after {} s and {attempt} attempts: the hub refused every \
                         connection (is {target} running and offering it, and does the \
                         policy let this VM connect?); last answer: {e}",
                        start.elapsed().as_secs()
                    ));
                }
                std::thread::sleep(pause);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_back_off_and_all_fit_well_inside_the_boot_timeout() {
        assert_eq!(retry_pause(0), Duration::from_secs(1));
        assert_eq!(retry_pause(3), Duration::from_secs(8));
        assert_eq!(retry_pause(40), Duration::from_secs(10));
        let mut waited = Duration::ZERO;
        let mut attempts = 0;
        while waited + retry_pause(attempts) <= ASK_WAIT {
            waited += retry_pause(attempts);
            attempts += 1;
        }
        assert!(attempts < 30, "{attempts} attempts");
        // `bulkhead-rootfs boot` gives up after 600 s.
        assert!(ASK_WAIT * 3 <= Duration::from_secs(600));
    }
}
