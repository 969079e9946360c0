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
//! Every program starts at boot (or, with `wait_for = "/path"`, once that path exists); the
//! VM powers off when the last one has ended (at once when there is none: a guest that only
//! boots, as the VMM benchmark's).
//!
//! A guest that names Debian packages gets a root filesystem made of them:
//!
//! ```toml
//! packages = ["weston", "wl-clipboard"]  # the image builder makes an ext4 of their closure
//!
//! [[program]]
//! name = "shm"
//! exec = ["/usr/bin/weston-simple-shm"]   # Debian's programs at their Debian paths
//! wait_for = "/run/user/0/wayland-0"      # started once the path exists
//! [[program]]
//! name = "proxy"
//! exec = ["/usr/local/bin/bulkhead-wl-app-proxy"]  # ours, from the initramfs
//! ```
//!
//! The VMM gives it as the first disk (`/dev/vda`, read-only); the guest init mounts it
//! read-only as `/`, with tmpfs on `/tmp` and `/run`, and `/run/user/0` (mode 0700) as every
//! program's `XDG_RUNTIME_DIR`. Bulkhead's own binaries, still carried by the initramfs,
//! appear at `/usr/local/bin`, and `/etc/bulkhead` is the initramfs's.

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
pub const PROGRAM_PATH: &str = "/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin";

/// A guest with packages: the disk its root filesystem is on (the VMM's first disk).
pub const ROOT_DEVICE: &str = "/dev/vda";

/// A guest with packages: the modules that reach its root disk, loaded before its own.
/// `crc32c_generic` is ext4's checksum: ext4 names it only by the crypto alias `crc32c`
/// (a soft dependency no image builder can resolve without an alias table); the cloud
/// kernel has it built in, the generic kernel as a module, without which its ext4 cannot
/// mount the root ("Cannot load crc32c driver").
pub const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

/// A guest with packages: where its programs find Bulkhead's binaries (from the initramfs).
pub const LOCAL_BIN: &str = "/usr/local/bin";

/// A guest with packages: every program's `XDG_RUNTIME_DIR` (tmpfs, mode 0700).
pub const RUNTIME_DIR: &str = "/run/user/0";

/// Most packages one guest names (their closure is apt's business).
pub const MAX_PACKAGES: usize = 64;

/// Is `name` a Debian package name (Debian policy §5.6.1: lower-case letters, digits and
/// `+-.`, at least two characters, starting with a letter or digit; an optional `:arch`)?
/// Names reach apt's command line, so nothing else gets through.
pub fn valid_package_name(name: &str) -> bool {
    let (pkg, arch) = match name.split_once(':') {
        Some((p, a)) => (p, Some(a)),
        None => (name, None),
    };
    let pkg_ok = pkg.len() >= 2
        && pkg.len() <= 100
        && pkg
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && pkg
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let arch_ok = arch.is_none_or(|a| {
        !a.is_empty() && a.len() <= 32 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    pkg_ok && arch_ok
}

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
    /// Debian packages its root filesystem is made of (empty: the guest runs from its
    /// initramfs alone).
    #[serde(default)]
    pub packages: Vec<String>,
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
    /// Environment besides `PATH` (and, with packages, `XDG_RUNTIME_DIR` and `HOME`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// An absolute path: the program starts once it exists (a socket another program
    /// makes, for example).
    #[serde(default)]
    pub wait_for: Option<String>,
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
        if self.packages.len() > MAX_PACKAGES {
            return Err(format!("at most {MAX_PACKAGES} packages"));
        }
        if let Some(bad) = self.packages.iter().find(|p| !valid_package_name(p)) {
            return Err(format!("package {bad:?}: not a Debian package name"));
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
            if let Some(w) = &p.wait_for {
                if !w.starts_with('/') || w.contains('\0') || w.len() > 4096 {
                    return Err(format!(
                        "program {:?}: wait_for {w:?} is not an absolute path",
                        p.name
                    ));
                }
            }
            if self.has_root() && p.exec.iter().any(|a| a.starts_with("/bin/bulkhead-")) {
                return Err(format!(
                    "program {:?}: in a guest with packages Bulkhead's binaries are at \
                     {LOCAL_BIN}/ (/bin is Debian's)",
                    p.name
                ));
            }
            for (k, v) in &p.env {
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    return Err(format!("program {:?}: bad environment entry {k:?}", p.name));
                }
            }
        }
        Ok(())
    }

    /// True if the guest has a root filesystem of Debian packages.
    pub fn has_root(&self) -> bool {
        !self.packages.is_empty()
    }

    /// Every Bulkhead binary the programs run (as the program or as an argument): the
    /// binaries the guest image must carry. They are `/bin/<name>` in a guest without
    /// packages, `/usr/local/bin/<name>` in one with (where `/bin` is Debian's).
    pub fn binaries(&self) -> Vec<String> {
        let dir = if self.has_root() {
            "/usr/local/bin/"
        } else {
            "/bin/"
        };
        let mut out: Vec<String> = Vec::new();
        // At the start of an argument, or inside one (`sh -c "… /usr/local/bin/x …"`,
        // `run:/usr/local/bin/x …`).
        let found = self
            .program
            .iter()
            .flat_map(|p| p.exec.iter())
            .flat_map(|arg| {
                arg.match_indices(dir)
                    .filter(|(i, _)| {
                        *i == 0
                            || !arg
                                .as_bytes()
                                .get(i - 1)
                                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'/')
                    })
                    .filter_map(|(i, _)| {
                        arg.get(i + dir.len()..)?
                            .split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ';')
                            .next()
                    })
                    .filter(|b| !b.is_empty())
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            });
        for bin in found {
            let bin = bin.as_str();
            {
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
    fn a_guest_with_debian_packages() {
        let c = parse(
            r#"
            packages = ["weston", "wl-clipboard"]
            [[program]]
            name = "proxy"
            exec = ["/usr/local/bin/bulkhead-wl-app-proxy"]
            [[program]]
            name = "shm"
            exec = ["/usr/bin/weston-simple-shm"]
            wait_for = "/run/user/0/wayland-0"
            "#,
        )
        .unwrap();
        assert!(c.has_root());
        assert_eq!(c.binaries(), ["bulkhead-wl-app-proxy"]);
        assert_eq!(
            c.program[1].wait_for.as_deref(),
            Some("/run/user/0/wayland-0")
        );
        // /bin/x is Debian's there, never one of ours.
        let c = parse("packages = [\"dash\"]\n[[program]]\nname = \"sh\"\nexec = [\"/bin/sh\"]\n")
            .unwrap();
        assert!(c.binaries().is_empty());
    }

    #[test]
    fn only_debian_package_names_pass() {
        for ok in [
            "weston",
            "wl-clipboard",
            "libstdc++6",
            "g++",
            "libc6:amd64",
            "xz-utils",
        ] {
            assert!(valid_package_name(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "Weston",
            "-rf",
            "weston;reboot",
            "a b",
            "pkg=1.0",
            "pkg/bookworm",
            "x:",
            "../x",
        ] {
            assert!(!valid_package_name(bad), "{bad}");
        }
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
            ("packages = [\"weston;reboot\"]", "not a Debian package name"),
            ("packages = [\"Weston\"]", "not a Debian package name"),
            (
                "packages = [\"weston\"]\n[[program]]\nname = \"p\"\nexec = [\"/bin/bulkhead-x\"]",
                "Bulkhead's binaries are at /usr/local/bin/",
            ),
            (
                "[[program]]\nname = \"p\"\nexec = [\"/x\"]\nwait_for = \"run/x\"",
                "not an absolute path",
            ),
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
