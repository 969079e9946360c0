//! `[host]` and `[kernel]`: what the host does when idle, its shutdown and restart timing,
//! its modules, and which Debian kernel an image carries.

use serde::Deserialize;

/// What to do once every service has ended for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenIdle {
    /// Keep running (the control socket still works).
    #[default]
    Stay,
    /// Power the machine off.
    Poweroff,
    /// Reboot.
    Reboot,
    /// Halt.
    Halt,
}

/// `[host]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Set with sethostname(2) when present.
    pub hostname: Option<String>,
    /// Kernel modules to load, each with its dependencies.
    #[serde(default)]
    pub modules: Vec<String>,
    /// What to do once every service has ended for good.
    #[serde(default)]
    pub when_idle: WhenIdle,
    /// Grace between the final kill(-1, SIGTERM) and kill(-1, SIGKILL).
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// At shutdown every service gets SIGTERM at once and SIGKILL at its own
    /// `stop_timeout_ms`; this caps them all: one overall deadline (default: none beyond
    /// the services' own).
    pub shutdown_timeout_ms: Option<u64>,
    /// How long init waits for module loading and device binding (run in a child, since a
    /// driver can hang in the kernel) before it starts the services without them.
    #[serde(default = "default_setup_timeout_ms")]
    pub setup_timeout_ms: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            hostname: None,
            modules: Vec::new(),
            when_idle: WhenIdle::default(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            shutdown_timeout_ms: None,
            setup_timeout_ms: default_setup_timeout_ms(),
        }
    }
}

fn default_shutdown_grace_ms() -> u64 {
    3000
}
fn default_setup_timeout_ms() -> u64 {
    60_000
}

/// A Debian kernel flavour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelFlavour {
    /// `linux-image-cloud-amd64`: small, for virtual machines (virtio, no DRM, few NICs).
    #[default]
    Cloud,
    /// `linux-image-amd64`: every driver Debian builds.
    Generic,
}

/// `[kernel]` of a system.toml or a guest.toml (read by the image builder).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// `cloud` or `generic`.
    pub flavour: Option<KernelFlavour>,
    /// The Debian suite the kernel comes from: `system` (the build machine's own apt
    /// sources), `backports` (the build machine's release's backports), or a suite or
    /// codename such as `stable` or `bookworm-backports`.
    pub suite: Option<String>,
}

impl KernelConfig {
    /// Checks the suite's spelling; `at` names the table in messages.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        match &self.suite {
            Some(s) if !valid_suite_name(s) => Err(format!(
                "{at} suite {s:?}: a Debian suite is 1 to 40 of [a-z0-9-] (e.g. \"system\", \"backports\", \"stable\")"
            )),
            _ => Ok(()),
        }
    }
}

/// A Debian suite or codename: `[a-z0-9-]`, 1 to 40 characters, not starting with `-`.
pub fn valid_suite_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
