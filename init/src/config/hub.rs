//! `[hub]`: the IPC hub init starts first and links to every VM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::service::{
    default_burst, default_burst_interval_ms, default_restart_delay_max_ms,
    default_stable_after_ms, default_stop_timeout_ms, RestartParams, RestartPolicy,
};

/// Name of the hub's child in messages and status.
pub const HUB_NAME: &str = "hub";

/// Init's own directory: root's alone (mode 0700), for its control socket and the transient
/// policy. Nobody else's runtime directory may be inside it.
pub const INIT_RUNTIME_DIR: &str = "/run/bulkhead";

/// `[hub]`: the hub process, started before every service. Init makes one SOCK_SEQPACKET
/// socketpair per `vm`, keeps both ends across restarts, and appends `--vm NAME=FD` for
/// each VM to `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Absolute program path, then its arguments.
    pub exec: Vec<String>,
    /// Environment; when absent the hub gets only PATH=/bin.
    pub env: Option<BTreeMap<String, String>>,
    /// Run the hub as this uid (and `group`, default the same number), with no
    /// supplementary groups: the hub needs no privilege. Required (and never 0).
    pub user: Option<u32>,
    /// Its gid (default: `user`).
    pub group: Option<u32>,
    /// A directory init creates before each start, owned by the hub's user, mode 0750, for
    /// its control socket and audit log (e.g. `/run/bulkhead-hub`); the one place the jailed
    /// hub may write. Never init's own directory (`/run/bulkhead`).
    pub runtime_dir: Option<PathBuf>,
    /// Jail: extra host paths bind-mounted read-only (e.g. the policy directories).
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
    /// Jail: the hub's cgroup memory.max, e.g. `256M`.
    pub memory_max: Option<String>,
    /// Jail: the cgroup's pids.max.
    pub pids_max: Option<u32>,
    /// Jail: the cgroup's cpu.weight (1 to 10000).
    pub cpu_weight: Option<u32>,
    /// Jail: RLIMIT_NOFILE (soft and hard); the hub's budgets need headroom.
    pub nofile: Option<u64>,
    /// What happens to the VMs (every service with `vm =`: they all have a hub channel)
    /// when the hub fails past its start limit.
    #[serde(default)]
    pub on_failure: HubFailure,
    /// First restart delay (default 200 ms; doubles like a service's).
    pub restart_delay_ms: Option<u64>,
    /// Start limit: at most this many starts in `burst_interval_ms` (default 5), then the
    /// hub is failed and `on_failure` applies.
    pub burst: Option<u32>,
    /// The start limit's window (default 60 s).
    pub burst_interval_ms: Option<u64>,
    /// SIGTERM → SIGKILL at a stop (default 5 s).
    pub stop_timeout_ms: Option<u64>,
}

/// `[hub] on_failure`: what init does with the VMs once the hub has failed for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HubFailure {
    /// Stop them (power button, stop timeout, SIGKILL); they stay stopped until an
    /// operator starts them.
    #[default]
    StopVms,
    /// Stop them and hold them: init starts them again by itself once the hub runs again
    /// (`bulkhead-ctl reset-failed hub`).
    HoldVms,
}

impl HubConfig {
    /// The hub's supervision: restarted whenever it ends, quickly.
    pub fn restart_params(&self) -> RestartParams {
        let delay = Duration::from_millis(self.restart_delay_ms.unwrap_or(200));
        RestartParams {
            policy: RestartPolicy::Always,
            delay,
            delay_max: Duration::from_millis(default_restart_delay_max_ms()).max(delay),
            stable_after: Duration::from_millis(default_stable_after_ms()),
            burst: self.burst.unwrap_or_else(default_burst),
            burst_interval: Duration::from_millis(
                self.burst_interval_ms
                    .unwrap_or_else(default_burst_interval_ms),
            ),
            stop_timeout: Duration::from_millis(
                self.stop_timeout_ms.unwrap_or_else(default_stop_timeout_ms),
            ),
        }
    }

    /// The `--control-socket` its command line names, if any (where `bulkhead-ctl ls`
    /// asks the hub for its connections).
    pub fn control_socket(&self) -> Option<PathBuf> {
        let mut it = self.exec.iter();
        while let Some(a) = it.next() {
            if a == "--control-socket" {
                return it.next().map(PathBuf::from);
            }
            if let Some(p) = a.strip_prefix("--control-socket=") {
                return Some(PathBuf::from(p));
            }
        }
        None
    }

    /// The environment the hub runs with.
    pub fn environment(&self) -> BTreeMap<String, String> {
        match &self.env {
            Some(env) => env.clone(),
            None => BTreeMap::from([("PATH".to_string(), "/bin".to_string())]),
        }
    }
}
