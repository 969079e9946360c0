//! Which QEMU runs the machine, and the CPU model it gets: `-cpu max` for nested SVM, with
//! `cx16` masked on QEMU < 8.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// A QEMU version (`qemu-system-x86_64 --version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl QemuVersion {
    /// Parses `QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`.
    pub fn parse(version_output: &str) -> Option<Self> {
        let rest = version_output
            .lines()
            .find_map(|l| l.split("QEMU emulator version ").nth(1))?;
        let v = rest.split_whitespace().next()?;
        let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
        Some(Self {
            major: it.next()??,
            minor: it.next().flatten().unwrap_or(0),
            micro: it.next().flatten().unwrap_or(0),
        })
    }

    /// Asks `qemu` for its version (once per program and path).
    pub fn of(qemu: &Path) -> Option<Self> {
        type Seen = Vec<(PathBuf, Option<QemuVersion>)>;
        static SEEN: OnceLock<Mutex<Seen>> = OnceLock::new();
        let seen = SEEN.get_or_init(|| Mutex::new(Vec::new()));
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = seen.iter().find(|(p, _)| p == qemu) {
            return *v;
        }
        let v = Command::new(qemu)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| Self::parse(&String::from_utf8_lossy(&o.stdout)));
        seen.push((qemu.to_path_buf(), v));
        v
    }
}

/// The CPU model a Bulkhead host runs on under `version` (TCG), and why.
///
/// `max` exposes SVM, which the host's KVM needs for nested guests. Under QEMU 7.2 (Debian
/// 12) the emulated host crashes at random with `-cpu max` (faults right after a
/// `cmpxchg16b`, stack-guard hits in `exc_page_fault`, QEMU killed by a signal: 2 boots in
/// 11 of the example with 6.1, 5 in 14 with 6.12); with `cx16` masked, none in 12; QEMU 10
/// (Debian 13) shows no fault with plain `max`. `BULKHEAD_QEMU_CPU` overrides the choice.
pub fn cpu_model(version: Option<QemuVersion>) -> (String, String) {
    choose_cpu_model(version, std::env::var("BULKHEAD_QEMU_CPU").ok())
}

fn choose_cpu_model(version: Option<QemuVersion>, over: Option<String>) -> (String, String) {
    if let Some(cpu) = over.filter(|c| !c.is_empty()) {
        return (cpu, "set by BULKHEAD_QEMU_CPU".into());
    }
    match version {
        Some(v) if v.major < 8 => (
            "max,-cx16".into(),
            format!(
                "cx16 masked: QEMU {v} (< 8) crashes the emulated host at random with cmpxchg16b"
            ),
        ),
        Some(v) => ("max".into(), format!("QEMU {v} needs no workaround")),
        None => (
            "max,-cx16".into(),
            "QEMU version unknown: cx16 masked to be safe".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QemuConfig;
    use std::path::Path;

    #[test]
    fn qemu_versions_parse_from_version_output() {
        let deb12 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n\
                     Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";
        assert_eq!(
            QemuVersion::parse(deb12),
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            })
        );
        let deb13 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)";
        assert_eq!(QemuVersion::parse(deb13).map(|v| v.major), Some(10));
        assert_eq!(QemuVersion::parse("qemu-img version 7.2.0"), None);
    }

    #[test]
    fn cx16_is_masked_below_qemu_8_only() {
        let v = |major| {
            Some(QemuVersion {
                major,
                minor: 0,
                micro: 0,
            })
        };
        assert_eq!(choose_cpu_model(v(7), None).0, "max,-cx16");
        assert_eq!(choose_cpu_model(v(10), None).0, "max");
        assert_eq!(choose_cpu_model(None, None).0, "max,-cx16");
        assert_eq!(choose_cpu_model(v(7), Some("max".into())).0, "max");
        let mut c = QemuConfig::host(Path::new("/k"), Path::new("/i"), "quiet");
        c.cpu = choose_cpu_model(v(7), None).0;
        assert!(c.command_line().contains("-cpu max,-cx16 "));
    }
}
