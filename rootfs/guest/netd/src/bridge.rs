//! The bridge the NIC and every client's TAP are ports of, set up with Debian's iproute2
//! (`ip`, `bridge`): client ports are *isolated*, so app VMs reach the NIC's side (the
//! network, and the net VM itself) but never each other, and one app VM's broadcast storm
//! never reaches another's ring.

use std::process::Command;

/// Runs one iproute2 command; its stderr becomes the error.
pub fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("{prog}: {e} (is iproute2 installed?)"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The bridge and its uplink.
#[derive(Debug, Clone)]
pub struct Bridge {
    /// The bridge's name (`br0`).
    pub name: String,
}

impl Bridge {
    /// Creates `name` (or takes it if it exists), enslaves `uplink` and brings both up;
    /// gives the bridge `address` (CIDR) if one is given.
    pub fn setup(name: &str, uplink: &str, address: Option<&str>) -> Result<Bridge, String> {
        if run("ip", &["link", "show", "dev", name]).is_err() {
            run("ip", &["link", "add", "name", name, "type", "bridge"])?;
        }
        run("ip", &["link", "set", "dev", uplink, "master", name])?;
        run("ip", &["link", "set", "dev", uplink, "up"])?;
        run("ip", &["link", "set", "dev", name, "up"])?;
        if !wait_carrier(uplink, CARRIER_WAIT) {
            println!(
                "netd: {uplink} has no carrier yet (no cable, or the link is still coming up)"
            );
        }
        if let Some(a) = address {
            run("ip", &["addr", "replace", a, "dev", name])?;
        }
        Ok(Bridge {
            name: name.to_string(),
        })
    }

    /// Makes `tap` an isolated port of the bridge and brings it up.
    pub fn add_port(&self, tap: &str) -> Result<(), String> {
        run("ip", &["link", "set", "dev", tap, "master", &self.name])?;
        run("bridge", &["link", "set", "dev", tap, "isolated", "on"])?;
        run("ip", &["link", "set", "dev", tap, "up"])
    }
}

/// How long the bridge setup waits for the uplink's carrier.
pub const CARRIER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until `dev` has a carrier (sysfs `carrier` reads 1), at most `wait`.
pub fn wait_carrier(dev: &str, wait: std::time::Duration) -> bool {
    let end = std::time::Instant::now() + wait;
    let path = format!("/sys/class/net/{dev}/carrier");
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == "1") {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The NIC to use when none is named: the first interface backed by a device (a PCI
/// function, as the one passed through), waiting up to `wait` for its driver.
pub fn find_uplink(wait: std::time::Duration) -> Result<String, String> {
    let end = std::time::Instant::now() + wait;
    loop {
        let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map_err(|e| format!("/sys/class/net: {e}"))?
            .flatten()
            .filter(|e| e.path().join("device").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        if let Some(n) = names.into_iter().next() {
            return Ok(n);
        }
        if std::time::Instant::now() >= end {
            return Err(
                "no network interface backed by a device (is the NIC's driver loaded?)".into(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
