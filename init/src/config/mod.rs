//! `/etc/bulkhead/system.toml`: the host settings and the services init supervises.
//!
//! Unknown keys are errors (a typo must not silently change behaviour). A file that does
//! not parse or validate is reported with its path and position; init then runs with no
//! services, and `when_idle` applies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod host;
mod hub;
mod log;
mod service;

pub use host::*;
pub use hub::*;
pub use log::*;
pub use service::*;

/// Where init looks unless `bulkhead.system=` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/bulkhead/system.toml";

/// Largest system.toml init reads (bounded allocation in PID 1).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Most services one system may declare.
pub const MAX_SERVICES: usize = 256;

/// Errors reading or validating system.toml.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than `MAX_FILE_BYTES`.
    #[error("{path}: file too large ({size} bytes, at most {MAX_FILE_BYTES})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// TOML syntax, a wrong type, or an unknown key (the message names line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's explanation.
        message: String,
    },
    /// The file parsed but a value is not acceptable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// `[host]` (all defaults when absent).
    #[serde(default)]
    pub host: HostConfig,
    /// `[hub]`, if this host runs one.
    pub hub: Option<HubConfig>,
    /// `[[service]]` tables, in start order.
    #[serde(default)]
    pub service: Vec<ServiceConfig>,
    /// `[kernel]`: which Debian kernel the image builder boots the host (and its VMs, unless
    /// a guest chooses its own) with; init itself does not read it.
    pub kernel: Option<KernelConfig>,
    /// `[control]`: who else may read the host's state.
    #[serde(default)]
    pub control: ControlConfig,
    /// `[log]`: the services' log rings and where they are kept on disk.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[control]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Members of this group (a gid: the host has no /etc/group) may run `bulkhead-ctl ls`
    /// and `log`, through a second, read-only socket (`/run/bulkhead-read/init.sock`, in a
    /// directory root:<gid> 0750). Everything else stays root's.
    pub read_group: Option<u32>,
}

/// A service name is `[a-z0-9-]+` (at most 64 characters).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A module name: letters, digits, `-` and `_`.
pub fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An `exec` list: an absolute program path first, no NUL anywhere.
fn check_exec(at: &str, exec: &[String]) -> Result<(), String> {
    match exec.first() {
        None => return Err(format!("{at}: exec is empty")),
        Some(prog) if !prog.starts_with('/') => {
            return Err(format!("{at}: exec[0] {prog:?} must be an absolute path"))
        }
        Some(_) => {}
    }
    if exec.iter().any(|a| a.contains('\0')) {
        return Err(format!("{at}: exec contains a NUL byte"));
    }
    Ok(())
}

/// Parses `256M`, `1G`, `4096K`, `64MiB` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (t.get(..i).unwrap_or(""), 1u64 << 10),
        Some((i, 'M' | 'm')) => (t.get(..i).unwrap_or(""), 1 << 20),
        Some((i, 'G' | 'g')) => (t.get(..i).unwrap_or(""), 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?} (use e.g. 256M or 1G)"))
}

/// The limits and paths of a jail, checked the same way for services and the hub.
fn check_jail_knobs(
    at: &str,
    read_only: &[PathBuf],
    cpu_weight: Option<u32>,
    pids_max: Option<u32>,
    nofile: Option<u64>,
) -> Result<(), String> {
    for p in read_only {
        if !p.is_absolute() || p == Path::new("/") {
            return Err(format!(
                "{at}: read_only {}: an absolute path other than /",
                p.display()
            ));
        }
    }
    if cpu_weight.is_some_and(|w| !(1..=10_000).contains(&w)) {
        return Err(format!("{at}: cpu_weight must be 1 to 10000"));
    }
    if pids_max == Some(0) {
        return Err(format!("{at}: pids_max must be at least 1"));
    }
    if nofile.is_some_and(|n| n < 16) {
        return Err(format!("{at}: nofile must be at least 16"));
    }
    Ok(())
}

impl SystemConfig {
    /// Every service with a `user` and the hub run as a uid and gid of their own, never 0:
    /// the hub's attenuation (read-only memfds, pipe directions) holds only if no two
    /// processes it mediates share a uid.
    fn check_users(&self) -> Result<(), String> {
        let mut uids: BTreeMap<u32, String> = BTreeMap::new();
        let mut gids: BTreeMap<u32, String> = BTreeMap::new();
        let hub = self
            .hub
            .iter()
            .map(|h| ("[hub]".to_string(), h.user, h.group));
        let services = self
            .service
            .iter()
            .map(|s| (format!("[[service]] {:?}", s.name), s.user, s.group));
        for (who, user, group) in hub.chain(services) {
            let Some(uid) = user.filter(|u| *u != 0) else {
                continue; // none, or 0 (refused below with its own message)
            };
            let gid = group.unwrap_or(uid);
            if gid == 0 {
                return Err(format!("{who}: group 0 is root's; use a group of its own"));
            }
            if let Some(other) = uids.insert(uid, who.clone()) {
                return Err(format!(
                    "{who}: user {uid} is also {other}'s; each jailed process needs a uid of \
                     its own"
                ));
            }
            if let Some(other) = gids.insert(gid, who.clone()) {
                return Err(format!(
                    "{who}: group {gid} is also {other}'s; each jailed process needs a gid of \
                     its own"
                ));
            }
        }
        Ok(())
    }

    /// `fds`: a path or a socketpair each, an `arg` that names it, and every socketpair
    /// shared by exactly two services.
    fn check_fds(&self) -> Result<(), String> {
        let mut pairs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in &self.service {
            let at = format!("[[service]] {:?}", s.name);
            for f in &s.fds {
                if !f.arg.contains("{fd}") || f.arg.contains('\0') {
                    return Err(format!(
                        "{at}: fds: arg {:?} must contain {{fd}} (e.g. \"--disk-fd={{fd}}\")",
                        f.arg
                    ));
                }
                match (&f.open, &f.socketpair) {
                    (Some(p), None) => {
                        if !p.is_absolute() {
                            return Err(format!("{at}: fds: open {} is not absolute", p.display()));
                        }
                        if f.kind.is_some() {
                            return Err(format!("{at}: fds: kind is for a socketpair"));
                        }
                    }
                    (None, Some(name)) => {
                        if !valid_name(name) {
                            return Err(format!(
                                "{at}: fds: socketpair {name:?} must match [a-z0-9-]+"
                            ));
                        }
                        if f.write {
                            return Err(format!("{at}: fds: write is for open"));
                        }
                        if !matches!(f.kind.as_deref(), None | Some("stream" | "seqpacket")) {
                            return Err(format!("{at}: fds: kind must be stream or seqpacket"));
                        }
                        pairs.entry(name).or_default().push(&s.name);
                    }
                    _ => {
                        return Err(format!(
                            "{at}: fds: each entry has either open or socketpair"
                        ))
                    }
                }
            }
        }
        for (name, users) in pairs {
            if users.len() != 2 {
                return Err(format!(
                    "socketpair {name:?} is named by {} service(s) ({}); it needs exactly two",
                    users.len(),
                    users.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates the text of a system.toml; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<SystemConfig, ConfigError> {
        let config: SystemConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Reads, parses and validates a system.toml.
    pub fn load(path: &Path) -> Result<SystemConfig, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        if size > MAX_FILE_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let mut text = String::new();
        file.take(MAX_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Self::parse(&text, path)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(h) = &self.host.hostname {
            if h.is_empty() || h.len() > 64 || h.bytes().any(|b| !(b.is_ascii_graphic())) {
                return Err(format!(
                    "[host] hostname {h:?}: 1 to 64 printable characters without spaces"
                ));
            }
        }
        if let Some(k) = &self.kernel {
            k.validate("[kernel]")?;
        }
        self.log.validate()?;
        if self.control.read_group == Some(0) {
            return Err("[control] read_group 0 is root's group; name the operators' own".into());
        }
        if self.host.shutdown_timeout_ms == Some(0) {
            return Err("[host] shutdown_timeout_ms must be at least 1".into());
        }
        for m in &self.host.modules {
            if !valid_module_name(m) {
                return Err(format!(
                    "[host] modules: {m:?} is not a module name (letters, digits, - and _)"
                ));
            }
        }
        if self.service.len() > MAX_SERVICES {
            return Err(format!(
                "{} services declared, at most {MAX_SERVICES}",
                self.service.len()
            ));
        }
        if let Some(hub) = &self.hub {
            check_exec("[hub]", &hub.exec)?;
            if hub.group.is_some() && hub.user.is_none() {
                return Err("[hub]: group needs user".to_string());
            }
            if let Some(d) = &hub.runtime_dir {
                if !d.is_absolute() {
                    return Err(format!(
                        "[hub]: runtime_dir {} must be an absolute path",
                        d.display()
                    ));
                }
            }
            if self.service.iter().any(|s| s.name == HUB_NAME) {
                return Err(format!(
                    "a [[service]] is named {HUB_NAME:?}, the name of the [hub]'s process"
                ));
            }
            match hub.user {
                None => {
                    return Err(
                        "[hub]: user is required: the hub runs unprivileged (e.g. user = 900)"
                            .to_string(),
                    )
                }
                Some(0) => return Err("[hub]: user 0 is root; the hub runs unprivileged".into()),
                Some(_) => {}
            }
        }
        if let Some(hub) = &self.hub {
            check_jail_knobs(
                "[hub]",
                &hub.read_only,
                hub.cpu_weight,
                hub.pids_max,
                hub.nofile,
            )?;
            if let Some(m) = &hub.memory_max {
                parse_size(m).map_err(|e| format!("[hub]: memory_max: {e}"))?;
            }
            if hub.burst == Some(0) || hub.burst_interval_ms == Some(0) {
                return Err("[hub]: burst and burst_interval_ms must be at least 1".into());
            }
            if let Some(d) = &hub.runtime_dir {
                if d.starts_with(INIT_RUNTIME_DIR) {
                    return Err(format!(
                        "[hub]: runtime_dir {} is inside {INIT_RUNTIME_DIR}, init's own \
                         root-only directory (its control socket and the transient policy); \
                         give the hub a directory of its own, e.g. /run/bulkhead-hub",
                        d.display()
                    ));
                }
            }
        }
        self.check_users()?;
        self.check_fds()?;
        let mut vms = BTreeSet::new();
        let mut names = BTreeSet::new();
        for (i, s) in self.service.iter().enumerate() {
            let at = format!("[[service]] #{} ({:?})", i + 1, s.name);
            if !valid_name(&s.name) {
                return Err(format!(
                    "{at}: name must match [a-z0-9-]+ (at most 64 characters)"
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(format!("{at}: duplicate service name"));
            }
            if self.log.dir.is_some() && s.name == "logd" {
                return Err(format!(
                    "{at}: \"logd\" is the name of the log writer init starts for [log] dir"
                ));
            }
            if let Some(vm) = &s.vm {
                if !valid_name(vm) {
                    return Err(format!(
                        "{at}: vm {vm:?} must match [a-z0-9-]+ (at most 64 characters)"
                    ));
                }
                if !vms.insert(vm.as_str()) {
                    return Err(format!("{at}: vm {vm:?} is run by another service too"));
                }
                if vm == HUB_NAME {
                    return Err(format!(
                        "{at}: vm {vm:?} is the name of the hub's cgroup; pick another"
                    ));
                }
                if s.user.is_none() {
                    return Err(format!(
                        "{at}: a VM's service needs its own user (e.g. user = 1001): every \
                         VMM runs jailed as a uid no other service has"
                    ));
                }
            }
            check_exec(&at, &s.exec)?;
            if s.group.is_some() && s.user.is_none() {
                return Err(format!("{at}: group needs user"));
            }
            if s.user == Some(0) {
                return Err(format!(
                    "{at}: user 0 is root; leave user out to run as root"
                ));
            }
            if s.burst == 0 {
                return Err(format!("{at}: burst must be at least 1"));
            }
            if s.burst_interval_ms == 0 {
                return Err(format!("{at}: burst_interval_ms must be at least 1"));
            }
            if s.restart_delay_max_ms < s.restart_delay_ms {
                return Err(format!(
                    "{at}: restart_delay_max_ms ({}) is below restart_delay_ms ({})",
                    s.restart_delay_max_ms, s.restart_delay_ms
                ));
            }
            if s.restart == RestartPolicy::OnReboot && s.vm.is_none() {
                return Err(format!(
                    "{at}: restart = \"on-reboot\" is for VMs (a VMM's status 3 says its guest \
                     rebooted); this service has no vm"
                ));
            }
            check_jail_knobs(&at, &s.read_only, s.cpu_weight, s.pids_max, s.nofile)?;
            if let Some(m) = &s.memory_overhead {
                parse_size(m).map_err(|e| format!("{at}: memory_overhead: {e}"))?;
            }
            if let Some(env) = &s.env {
                for (k, v) in env {
                    if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                        return Err(format!("{at}: env key {k:?} is not a valid variable"));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(text: &str) -> Result<SystemConfig, ConfigError> {
        SystemConfig::parse(text, Path::new("/etc/bulkhead/system.toml"))
    }

    const FULL: &str = r#"
[host]
hostname = "bulkhead"
modules = ["kvm-amd", "vfio-pci", "button", "evdev"]
when_idle = "poweroff"
shutdown_grace_ms = 3000

[[service]]
name = "hello"
exec = ["/bin/prog", "arg"]
restart = "on-failure"
restart_delay_ms = 1000
restart_delay_max_ms = 60000
stable_after_ms = 30000
burst = 5
burst_interval_ms = 60000
stop_timeout_ms = 5000
env = { KEY = "value" }

[[service]]
name = "second-1"
exec = ["/bin/other"]
restart = "always"
"#;

    #[test]
    fn a_kernel_choice_is_read_and_checked() {
        let c = parse("[kernel]\nflavour = \"generic\"\nsuite = \"bookworm-backports\"\n").unwrap();
        let k = c.kernel.unwrap();
        assert_eq!(k.flavour, Some(KernelFlavour::Generic));
        assert_eq!(k.suite.as_deref(), Some("bookworm-backports"));
        assert_eq!(parse("").unwrap().kernel, None);
        for (text, want) in [
            ("[kernel]\nflavour = \"rt\"", "unknown variant"),
            ("[kernel]\nsuite = \"../etc\"", "a Debian suite is"),
            ("[kernel]\nsuite = \"\"", "a Debian suite is"),
            ("[kernel]\nversion = \"6.12\"", "unknown field"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn full_example_parses() {
        let c = parse(FULL).unwrap();
        assert_eq!(c.host.hostname.as_deref(), Some("bulkhead"));
        assert_eq!(c.host.modules.len(), 4);
        assert_eq!(c.host.when_idle, WhenIdle::Poweroff);
        assert_eq!(c.service.len(), 2);
        let hello = &c.service[0];
        assert_eq!(hello.restart, RestartPolicy::OnFailure);
        assert_eq!(
            hello.environment().get("KEY").map(String::as_str),
            Some("value")
        );
        assert!(!hello.environment().contains_key("PATH"));
        let second = &c.service[1];
        assert_eq!(second.restart, RestartPolicy::Always);
        assert_eq!(second.restart_params().delay, Duration::from_secs(1));
        assert_eq!(second.restart_params().burst, 5);
        assert_eq!(
            second.environment(),
            BTreeMap::from([("PATH".to_string(), "/bin".to_string())])
        );
    }

    #[test]
    fn empty_file_means_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, SystemConfig::default());
        assert_eq!(c.host.when_idle, WhenIdle::Stay);
        assert_eq!(c.host.shutdown_grace_ms, 3000);
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let e = err("[host]\nhostnme = \"x\"\n");
        assert!(e.contains("/etc/bulkhead/system.toml"), "{e}");
        assert!(e.contains("hostnme"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        let e = err("[[service]]\nname = \"a\"\nexec = [\"/a\"]\nrestrat = \"never\"\n");
        assert!(e.contains("restrat"), "{e}");
        let e = err("[hots]\n");
        assert!(e.contains("hots"), "{e}");
    }

    #[test]
    fn wrong_types_and_values() {
        assert!(err("[host]\nwhen_idle = \"explode\"\n").contains("explode"));
        assert!(
            err("[[service]]\nname = \"a\"\nexec = [\"/a\"]\nrestart = \"sometimes\"\n")
                .contains("sometimes")
        );
        assert!(err("[[service]]\nname = \"a\"\nexec = \"/a\"\n").contains("exec"));
        assert!(err("[[service]]\nexec = [\"/a\"]\n").contains("name"));
        assert!(err("[host\n").contains("line 1"));
    }

    #[test]
    fn validation_errors() {
        let svc = |name: &str, exec: &str, extra: &str| {
            format!("[[service]]\nname = \"{name}\"\nexec = [{exec}]\n{extra}\n")
        };
        assert!(err(&svc("Hello", "\"/a\"", "")).contains("[a-z0-9-]+"));
        assert!(err(&svc("a_b", "\"/a\"", "")).contains("[a-z0-9-]+"));
        assert!(err(&svc("a", "\"prog\"", "")).contains("absolute"));
        assert!(err(&svc("a", "", "")).contains("exec is empty"));
        assert!(err(&svc("a", "\"/a\"", "burst = 0")).contains("burst"));
        assert!(err(&svc(
            "a",
            "\"/a\"",
            "restart_delay_ms = 5000\nrestart_delay_max_ms = 10"
        ))
        .contains("restart_delay_max_ms"));
        assert!(err(&svc("a", "\"/a\"", "restart = \"on-reboot\"")).contains("for VMs"));
        let dup = format!("{}{}", svc("a", "\"/a\"", ""), svc("a", "\"/b\"", ""));
        assert!(err(&dup).contains("duplicate"));
        assert!(err("[host]\nmodules = [\"../evil\"]\n").contains("module name"));
        assert!(err("[host]\nhostname = \"a b\"\n").contains("hostname"));
        assert!(err(&svc("a", "\"/a\"", "group = 5")).contains("group needs user"));
        assert!(err(&svc("a", "\"/a\"", "user = 0")).contains("user 0 is root"));
        assert!(err("[hub]\nexec = [\"/bin/hub\"]\n").contains("[hub]: user is required"));
        assert!(err("[hub]\nexec = [\"/bin/hub\"]\nuser = 0\n").contains("user 0 is root"));
    }

    /// The jail's build-time checks: a VM's service needs a user, every uid and gid is
    /// one process's alone (hub included), the hub's directory is not init's, `fds` entries
    /// are well formed and each socketpair has exactly two ends.
    #[test]
    fn jail_rules_are_checked_when_the_system_is_read() {
        let vm = |name: &str, user: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvm = \"{name}\"\nexec = [\"/bin/vmm\"]\n{user}\n"
            )
        };
        assert!(err(&vm("a", "")).contains("needs its own user"));
        let two = format!("{}{}", vm("a", "user = 5"), vm("b", "user = 5"));
        assert!(err(&two).contains("user 5 is also"), "{}", err(&two));
        let two = format!("{}{}", vm("a", "user = 5"), vm("b", "user = 6\ngroup = 5"));
        assert!(err(&two).contains("group 5 is also"), "{}", err(&two));
        let hub = "[hub]\nexec = [\"/bin/hub\"]\nuser = 7\n";
        let clash = format!("{hub}{}", vm("a", "user = 7"));
        assert!(err(&clash).contains("user 7 is also"));
        let inside = format!("{hub}runtime_dir = \"/run/bulkhead/hub\"\n");
        assert!(err(&inside).contains("init's own"), "{}", err(&inside));
        assert!(err(&vm("hub", "user = 9")).contains("hub's cgroup"));
        assert!(err(&vm("a", "user = 9\ncpu_weight = 0")).contains("cpu_weight"));
        assert!(err(&vm("a", "user = 9\nread_only = [\"/\"]")).contains("read_only"));
        assert!(err(&vm("a", "user = 9\nmemory_overhead = \"lots\"")).contains("memory_overhead"));
        let fds = |f: &str| vm("a", &format!("user = 9\nfds = [{f}]"));
        assert!(err(&fds("{ open = \"/x\", arg = \"--disk\" }")).contains("{fd}"));
        assert!(err(&fds("{ open = \"x\", arg = \"{fd}\" }")).contains("not absolute"));
        assert!(err(&fds("{ arg = \"{fd}\" }")).contains("either open or socketpair"));
        assert!(err(&fds("{ socketpair = \"p\", arg = \"{fd}\" }")).contains("exactly two"));
        let pair = format!(
            "{}[[service]]\nname = \"peer\"\nexec = [\"/bin/p\"]\nfds = [{{ socketpair = \"p\", arg = \"{{fd}}\" }}]\n",
            fds("{ socketpair = \"p\", arg = \"--link={fd}\" }")
        );
        let c = parse(&pair).unwrap();
        assert_eq!(c.service[0].fds[0].socketpair.as_deref(), Some("p"));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("G").is_err());
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = SystemConfig::load(Path::new("/nonexistent/system.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/system.toml"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_is_an_error_or_valid_never_a_panic(text in "(?s).{0,300}") {
            let _ = parse(&text);
        }
    }
}
