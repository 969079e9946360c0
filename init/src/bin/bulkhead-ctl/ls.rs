//! `bulkhead-ctl ls`: init's list (every page), each jailed child's memory from its cgroup
//! (`memory.current`), and each VM's connections from the hub's control socket (root and
//! the hub's own user only: others see `-`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bulkhead_init::control::{Entry, Kind, ListPage, Request, Response};
use serde::Serialize;

use crate::conn::Conn;
use crate::CtlError;

/// Where cgroup2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One row, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub entry: Entry,
    /// `memory.current` of its cgroup.
    pub memory_bytes: Option<u64>,
    /// Connections the hub counts for this VM.
    pub hub_connections: Option<u32>,
}

/// The whole answer, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub services: Vec<Row>,
    pub config_error: Option<String>,
    pub shutting_down: bool,
    /// Why the hub's connections are missing, if they are.
    pub hub_error: Option<String>,
}

/// Every page of the list.
pub fn fetch(client: &Conn) -> Result<(Vec<Entry>, ListPage), CtlError> {
    let mut entries = Vec::new();
    let mut from = 0u32;
    for _ in 0..1024 {
        match client.call(&Request::List { from })? {
            Response::List(mut page) => {
                entries.append(&mut page.entries);
                match page.next {
                    Some(n) if n > from => from = n,
                    _ => return Ok((entries, page)),
                }
            }
            Response::Error(e) => return Err(CtlError::Refused(e)),
            other => return Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }
    Err(CtlError::Other("the list never ended".into()))
}

fn memory(cgroup: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new(CGROUP_ROOT).join(cgroup).join("memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn hub_connections(path: &Path) -> Result<BTreeMap<String, u32>, String> {
    use bulkhead_policy::control::{HubClient, Request as HubRequest, Response as HubResponse};
    let c = HubClient::connect(path).map_err(|e| e.to_string())?;
    match c.request(&HubRequest::Vms).map_err(|e| e.to_string())? {
        HubResponse::Vms(vms) => Ok(vms.into_iter().map(|v| (v.vm, v.connections)).collect()),
        HubResponse::Error { message } => Err(message),
        _ => Err("unexpected answer".into()),
    }
}

/// Gathers the listing.
pub fn listing(client: &Conn, hub_socket: Option<&Path>) -> Result<Listing, CtlError> {
    let (entries, last) = fetch(client)?;
    let hub_path: Option<PathBuf> = hub_socket
        .map(Path::to_path_buf)
        .or_else(|| last.hub_socket.as_ref().map(PathBuf::from));
    let wants_hub = entries.iter().any(|e| e.kind == Kind::Vm && e.needs_hub);
    let (conns, hub_error) = match (&hub_path, wants_hub) {
        (Some(p), true) => match hub_connections(p) {
            Ok(c) => (c, None),
            Err(e) => (BTreeMap::new(), Some(e)),
        },
        _ => (BTreeMap::new(), None),
    };
    let services = entries
        .into_iter()
        .map(|entry| Row {
            memory_bytes: entry.cgroup.as_deref().and_then(memory),
            hub_connections: entry.vm.as_ref().and_then(|vm| conns.get(vm).copied()),
            entry,
        })
        .collect();
    Ok(Listing {
        services,
        config_error: last.config_error,
        shutting_down: last.shutting_down,
        hub_error,
    })
}

/// `1h02m`, `3m04s`, `12.3s`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 86_400 {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    } else if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, (ms % 1000) / 100)
    }
}

/// `512K`, `3.2M`, `1.0G`.
pub fn bytes(n: u64) -> String {
    const K: u64 = 1024;
    if n >= K * K * K {
        format!("{:.1}G", n as f64 / (K * K * K) as f64)
    } else if n >= K * K {
        format!("{:.1}M", n as f64 / (K * K) as f64)
    } else if n >= K {
        format!("{}K", n / K)
    } else {
        format!("{n}B")
    }
}

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Service => "service",
        Kind::Vm => "vm",
        Kind::Hub => "hub",
    }
}

/// The text table.
pub fn render(l: &Listing) -> String {
    let mut out = String::new();
    if let Some(e) = &l.config_error {
        out.push_str(&format!(
            "system.toml was REJECTED; init runs no service:\n  {}\n",
            e.replace('\n', "\n  ")
        ));
    }
    if l.shutting_down {
        out.push_str("the host is shutting down\n");
    }
    let dash = || "-".to_string();
    let rows: Vec<[String; 10]> = l
        .services
        .iter()
        .map(|r| {
            let e = &r.entry;
            let state = match e.next_start_ms {
                Some(ms) => format!("{} ({})", e.state, duration(ms)),
                None => e.state.clone(),
            };
            [
                e.name.clone(),
                kind(e.kind).to_string(),
                state,
                e.pid.map_or_else(dash, |p| p.to_string()),
                e.uid.map_or_else(|| "0".into(), |u| u.to_string()),
                e.uptime_ms.map_or_else(dash, duration),
                e.starts.saturating_sub(1).to_string(),
                e.last_exit.clone().unwrap_or_else(dash),
                r.memory_bytes.map_or_else(dash, bytes),
                r.hub_connections.map_or_else(dash, |c| c.to_string()),
            ]
        })
        .collect();
    let head = [
        "NAME",
        "KIND",
        "STATE",
        "PID",
        "UID",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "MEMORY",
        "CONNS",
    ];
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(w.saturating_sub(c.chars().count())));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    out.push_str(&line(head.to_vec()));
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    if let Some(e) = &l.hub_error {
        out.push_str(&format!("(connections unknown: {e})\n"));
    }
    out
}

/// `bulkhead-ctl ls`.
pub fn run(client: &Conn, json: bool, hub_socket: Option<&Path>) -> Result<(), CtlError> {
    let l = listing(client, hub_socket)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&l).map_err(|e| CtlError::Other(e.to_string()))?
        );
    } else {
        print!("{}", render(&l));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, state: &str) -> Entry {
        Entry {
            name: name.into(),
            kind: Kind::Vm,
            vm: Some(name.into()),
            state: state.into(),
            pid: Some(42),
            uid: Some(1001),
            uptime_ms: Some(61_500),
            starts: 3,
            last_exit: Some("killed by signal SIGKILL".into()),
            cgroup: Some(format!("bulkhead/{name}")),
            next_start_ms: None,
            needs_hub: true,
        }
    }

    #[test]
    fn the_table_and_the_json_say_the_same() {
        let l = Listing {
            services: vec![
                Row {
                    entry: entry("vm-a", "running"),
                    memory_bytes: Some(300 << 20),
                    hub_connections: Some(2),
                },
                Row {
                    entry: Entry {
                        next_start_ms: Some(4000),
                        pid: None,
                        uptime_ms: None,
                        ..entry("vm-b", "backing-off")
                    },
                    memory_bytes: None,
                    hub_connections: None,
                },
            ],
            config_error: Some("/etc/bulkhead/system.toml: bad".into()),
            shutting_down: false,
            hub_error: None,
        };
        let t = render(&l);
        assert!(t.starts_with("system.toml was REJECTED"), "{t}");
        let row_a = t.lines().find(|l| l.starts_with("vm-a")).unwrap();
        for want in [
            "running",
            "42",
            "1001",
            "1m01s",
            "2",
            "killed by signal SIGKILL",
            "300.0M",
        ] {
            assert!(row_a.contains(want), "{want} not in {row_a:?}");
        }
        let row_b = t.lines().find(|l| l.starts_with("vm-b")).unwrap();
        assert!(row_b.contains("backing-off (4.0s)"), "{row_b}");
        let j: serde_json::Value = serde_json::to_value(&l).unwrap();
        assert_eq!(j["services"][0]["name"], "vm-a");
        assert_eq!(j["services"][0]["state"], "running");
        assert_eq!(j["services"][0]["memory_bytes"], 300 << 20);
        assert_eq!(j["services"][0]["hub_connections"], 2);
        assert_eq!(j["services"][0]["kind"], "vm");
        assert_eq!(j["config_error"], "/etc/bulkhead/system.toml: bad");
    }

    #[test]
    fn units() {
        assert_eq!(duration(1_234), "1.2s");
        assert_eq!(duration(3_723_000), "1h02m");
        assert_eq!(duration(90_061_000), "1d01h");
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(2048), "2K");
        assert_eq!(bytes(3 << 30), "3.0G");
    }
}
