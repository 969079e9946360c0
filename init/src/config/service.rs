//! `[[service]]`: one supervised process (a VM's VMM, the test programs), its restart
//! policy, the fds init hands it, and its jail's knobs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// When a service is started again after it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// When it exits with a non-zero status or is killed by a signal.
    #[default]
    OnFailure,
    /// Whenever it ends.
    Always,
    /// Only when its guest rebooted: bulkhead-vmm's exit status 3 ([`VMM_REBOOT_STATUS`]:
    /// the ACPI reset register, the 8042 reset line or a triple fault), as a machine comes
    /// back after a reboot; a VM that was stopped, killed or powered off stays down. For
    /// services with `vm =` only.
    OnReboot,
}

/// bulkhead-vmm's exit status when its guest rebooted (`bulkhead-vmm --help`).
pub const VMM_REBOOT_STATUS: i32 = 3;

/// One `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[a-z0-9-]+`, unique.
    pub name: String,
    /// Absolute program path, then its arguments.
    pub exec: Vec<String>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First backoff delay; doubles on each consecutive restart.
    #[serde(default = "default_restart_delay_ms")]
    pub restart_delay_ms: u64,
    /// Backoff ceiling.
    #[serde(default = "default_restart_delay_max_ms")]
    pub restart_delay_max_ms: u64,
    /// An uptime at least this long resets the backoff.
    #[serde(default = "default_stable_after_ms")]
    pub stable_after_ms: u64,
    /// At most this many starts in `burst_interval_ms`, then the service is failed.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// The burst window.
    #[serde(default = "default_burst_interval_ms")]
    pub burst_interval_ms: u64,
    /// SIGTERM → SIGKILL delay at shutdown.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Environment; when absent the service gets only PATH=/bin.
    pub env: Option<BTreeMap<String, String>>,
    /// The VM this service runs (its VMM): the policy's name for it. Init hands the VMM
    /// its hub channel (fd 3, `BULKHEAD_HUB_FD=3`, when `[hub]` is present) and the VFIO
    /// container and groups of the devices the policy grants this VM
    /// (`BULKHEAD_VFIO_CONTAINER_FD`, `BULKHEAD_VFIO_GROUP_FDS`), opened afresh at every start.
    pub vm: Option<String>,
    /// Run the service as this uid (and `group`, default the same number), with no
    /// supplementary groups, no capabilities and no_new_privs. A VMM needs no privilege once
    /// init has handed it `/dev/kvm`, its hub channel and its VFIO descriptors; its locked
    /// memory limit is lifted for VFIO's pinning before the switch.
    pub user: Option<u32>,
    /// Its gid (default: `user`).
    pub group: Option<u32>,
    /// Descriptors init opens (or makes) and hands over at exec, after its own (the hub
    /// channel, VFIO, /dev/kvm): a jailed VMM reaches a host disk or socket only this way.
    #[serde(default)]
    pub fds: Vec<FdSpec>,
    /// Jail (a service with `vm =`): extra host paths (files or directories) bind-mounted
    /// read-only at the same path. Regular files named in `exec` are added by themselves.
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
    /// Jail: what the VMM may use beyond guest memory (`--memory`), e.g. `128M`; its
    /// cgroup's memory.max is the sum.
    pub memory_overhead: Option<String>,
    /// Jail: the cgroup's pids.max (threads count).
    pub pids_max: Option<u32>,
    /// Jail: the cgroup's cpu.weight (1 to 10000).
    pub cpu_weight: Option<u32>,
    /// Jail: RLIMIT_NOFILE (soft and hard).
    pub nofile: Option<u64>,
}

/// One descriptor a service is handed: a file init opens, or one end of a socketpair init
/// makes for two services. `arg` is appended to `exec` with `{fd}` replaced by its number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FdSpec {
    /// A path init opens (as root, before the jail): read-only unless `write`.
    pub open: Option<PathBuf>,
    /// Open `open` for writing too.
    #[serde(default)]
    pub write: bool,
    /// The name of a socketpair (SOCK_SEQPACKET for `seqpacket`, SOCK_STREAM for
    /// `stream`): the two services that name it get one end each, kept across restarts.
    pub socketpair: Option<String>,
    /// `stream` (default) or `seqpacket`, for `socketpair`.
    pub kind: Option<String>,
    /// The argument that names it, e.g. `--disk-fd={fd}`.
    pub arg: String,
}

/// The supervision parameters of one child, in the units the supervisor uses. A service is
/// one kind of child; a VM (later `[[vm]]` tables) will be another, with its own recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartParams {
    /// Restart policy.
    pub policy: RestartPolicy,
    /// First backoff delay.
    pub delay: Duration,
    /// Backoff ceiling.
    pub delay_max: Duration,
    /// Uptime that resets the backoff.
    pub stable_after: Duration,
    /// Starts allowed per window.
    pub burst: u32,
    /// The window.
    pub burst_interval: Duration,
    /// SIGTERM → SIGKILL delay.
    pub stop_timeout: Duration,
}

impl ServiceConfig {
    /// The supervision parameters of this service.
    pub fn restart_params(&self) -> RestartParams {
        RestartParams {
            policy: self.restart,
            delay: Duration::from_millis(self.restart_delay_ms),
            delay_max: Duration::from_millis(self.restart_delay_max_ms),
            stable_after: Duration::from_millis(self.stable_after_ms),
            burst: self.burst,
            burst_interval: Duration::from_millis(self.burst_interval_ms),
            stop_timeout: Duration::from_millis(self.stop_timeout_ms),
        }
    }

    /// The environment the service runs with.
    pub fn environment(&self) -> BTreeMap<String, String> {
        match &self.env {
            Some(env) => env.clone(),
            None => BTreeMap::from([("PATH".to_string(), "/bin".to_string())]),
        }
    }
}

pub(super) fn default_restart_delay_ms() -> u64 {
    1000
}

pub(super) fn default_restart_delay_max_ms() -> u64 {
    60_000
}

pub(super) fn default_stable_after_ms() -> u64 {
    30_000
}

pub(super) fn default_burst() -> u32 {
    5
}

pub(super) fn default_burst_interval_ms() -> u64 {
    60_000
}

pub(super) fn default_stop_timeout_ms() -> u64 {
    5000
}
