//! `/etc/bulkhead/guest.toml`: what one guest loads and runs.
//!
//! ```toml
//! modules = ["virtio_pci", "virtio_wl"]   # loaded in order, each with its dependencies
//! stop_grace_ms = 3000                    # SIGTERM → SIGKILL when the VM is asked to stop
//!
//! [[program]]
//! name = "driver"                         # its console lines read "driver: …"
//! exec = ["/bin/bulkhead-edu", "--serve", "factorial"]
//! env = { RUST_LOG = "info" }             # optional; PATH is set for every program
//!
//! [kernel]                                # optional: the image builder boots this guest
//! flavour = "generic"                     # with another Debian kernel than the host's
//! suite = "backports"
//! ```
//!
//! Every program starts at boot; the VM powers off when the last one has ended (at once
//! when there is none: a guest that only boots, as the VMM benchmark's).

use std::collections::BTreeMap;
use std::path::Path;

use bulkhead_init::config::KernelConfig;
use serde::Deserialize;

/// Where the guest image carries its configuration.
pub const CONFIG_PATH: &str = "/etc/bulkhead/guest.toml";

/// Most programs one guest runs.
pub const MAX_PROGRAMS: usize = 16;

/// Longest program name (it prefixes every console line).
pub const MAX_NAME: usize = 32;

/// Loaded in every guest after its own modules, so the VMM's ACPI power button (how the host
/// asks a VM to stop) reaches the guest init as KEY_POWER; guest images carry them.
pub const POWER_BUTTON_MODULES: &[&str] = &["button", "evdev"];

/// The `PATH` every program gets.
pub const PROGRAM_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// A guest configuration that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// One guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Kernel modules to load, in this order, each after its dependencies.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Milliseconds between SIGTERM and SIGKILL when the VM is asked to stop.
    #[serde(default = "default_grace")]
    pub stop_grace_ms: u64,
    /// The programs the VM is for.
    #[serde(default)]
    pub program: Vec<Program>,
    /// The Debian kernel this guest boots when not the host's (read by the image builder).
    pub kernel: Option<KernelConfig>,
}

/// One program of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Its name: the prefix of its console lines.
    pub name: String,
    /// The absolute path of the program, then its arguments.
    pub exec: Vec<String>,
    /// Environment besides `PATH`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_grace() -> u64 {
    3000
}

impl GuestConfig {
    /// Parses and validates `text` (read from `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<GuestConfig, ConfigError> {
        let p = path.display().to_string();
        let config: GuestConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: p.clone(),
            message: e.to_string(),
        })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { path: p, message })?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<GuestConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        GuestConfig::parse(&text, path)
    }

    fn validate(&self) -> Result<(), String> {
        if self.program.len() > MAX_PROGRAMS {
            return Err(format!("at most {MAX_PROGRAMS} programs"));
        }
        if self.stop_grace_ms > 60_000 {
            return Err("stop_grace_ms is at most 60000".into());
        }
        if let Some(k) = &self.kernel {
            k.validate("[kernel]")?;
        }
        for m in &self.modules {
            let ok = !m.is_empty()
                && m.len() <= 64
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(format!("module {m:?}: not a module name"));
            }
        }
        for (i, p) in self.program.iter().enumerate() {
            let ok_name = !p.name.is_empty()
                && p.name.len() <= MAX_NAME
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !ok_name {
                return Err(format!(
                    "program {:?}: a name is 1 to {MAX_NAME} of [A-Za-z0-9._-]",
                    p.name
                ));
            }
            if self.program.iter().take(i).any(|q| q.name == p.name) {
                return Err(format!("program {:?} is named twice", p.name));
            }
            match p.exec.first() {
                Some(prog) if prog.starts_with('/') => {}
                Some(prog) => {
                    return Err(format!(
                        "program {:?}: exec {prog:?} is not an absolute path",
                        p.name
                    ))
                }
                None => return Err(format!("program {:?}: exec is empty", p.name)),
            }
            if p.exec.iter().any(|a| a.contains('\0')) {
                return Err(format!("program {:?}: exec has a NUL byte", p.name));
            }
            for (k, v) in &p.env {
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    return Err(format!("program {:?}: bad environment entry {k:?}", p.name));
                }
            }
        }
        Ok(())
    }

    /// Every `/bin/<name>` the programs run (as the program or as an argument): the
    /// binaries the guest image must carry.
    pub fn binaries(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for arg in self.program.iter().flat_map(|p| p.exec.iter()) {
            if let Some(bin) = arg.strip_prefix("/bin/") {
                if !out.iter().any(|b| b == bin) {
                    out.push(bin.to_string());
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GuestConfig, ConfigError> {
        GuestConfig::parse(text, Path::new("guest.toml"))
    }

    #[test]
    fn a_full_guest() {
        let c = parse(
            r#"
            modules = ["virtio_pci", "virtio_wl"]
            stop_grace_ms = 500
            [[program]]
            name = "driver"
            exec = ["/bin/bulkhead-edu", "--serve", "factorial"]
            [[program]]
            name = "hwrng"
            exec = ["/bin/bulkhead-hwrng"]
            env = { RUST_LOG = "debug" }
            "#,
        )
        .unwrap();
        assert_eq!(c.modules, ["virtio_pci", "virtio_wl"]);
        assert_eq!(c.stop_grace_ms, 500);
        assert_eq!(c.program.len(), 2);
        assert_eq!(c.program[1].env["RUST_LOG"], "debug");
        assert_eq!(c.binaries(), ["bulkhead-edu", "bulkhead-hwrng"]);
    }

    #[test]
    fn a_guest_may_choose_its_kernel() {
        let c = parse("[kernel]\nflavour = \"generic\"\nsuite = \"backports\"\n").unwrap();
        let k = c.kernel.unwrap();
        assert_eq!(
            k.flavour,
            Some(bulkhead_init::config::KernelFlavour::Generic)
        );
        assert_eq!(k.suite.as_deref(), Some("backports"));
        let e = parse("[kernel]\nsuite = \"Bad Suite\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("a Debian suite is"), "{e}");
    }

    #[test]
    fn a_guest_that_only_boots() {
        let c = parse("modules = []").unwrap();
        assert!(c.program.is_empty());
    }

    #[test]
    fn defaults() {
        let c = parse("[[program]]\nname = \"p\"\nexec = [\"/bin/x\"]\n").unwrap();
        assert!(c.modules.is_empty());
        assert_eq!(c.stop_grace_ms, 3000);
    }

    #[test]
    fn what_is_refused_and_why() {
        let cases: &[(&str, &str)] = &[
            ("[[program]]\nname = \"p\"\nexec = []", "exec is empty"),
            ("[[program]]\nname = \"p\"\nexec = [\"x\"]", "not an absolute path"),
            ("[[program]]\nname = \"\"\nexec = [\"/x\"]", "a name is 1 to"),
            ("[[program]]\nname = \"a b\"\nexec = [\"/x\"]", "a name is 1 to"),
            (
                "[[program]]\nname = \"p\"\nexec = [\"/x\"]\n[[program]]\nname = \"p\"\nexec = [\"/y\"]",
                "named twice",
            ),
            (
                "modules = [\"../evil\"]\n[[program]]\nname = \"p\"\nexec = [\"/x\"]",
                "not a module name",
            ),
            (
                "stop_grace_ms = 999999\n[[program]]\nname = \"p\"\nexec = [\"/x\"]",
                "at most 60000",
            ),
            (
                "[[program]]\nname = \"p\"\nexec = [\"/x\"]\nenv = { \"A=B\" = \"c\" }",
                "bad environment entry",
            ),
            (
                "[[program]]\nname = \"p\"\nexec = [\"/x\"]\nrestart = \"always\"",
                "unknown field",
            ),
            ("[host]\nmodules = []", "unknown field"),
            ("modules = ", "guest.toml"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e} lacks {want:?}");
            assert!(e.starts_with("guest.toml: "), "{e}");
        }
    }

    #[test]
    fn load_names_a_missing_file() {
        let e = GuestConfig::load(Path::new("/nonexistent/guest.toml")).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/guest.toml: "),
            "{e}"
        );
    }
}
