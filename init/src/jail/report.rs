//! What init says about a jailed process: the kernel's view of it once it runs
//! ([`observe`]), and how it ended when the jail or its filter did it ([`exit_note`]).

use super::{cgroup, JailPaths, CGROUP_PARENT};

/// What init says about a jailed child's end, beyond "exited"/"killed by": a seccomp kill
/// (SIGSYS) or an OOM kill in its cgroup (`oom_kills_before` from its start).
pub fn exit_note(
    vm: &str,
    signal: Option<&str>,
    paths: &JailPaths,
    oom_kills_before: u64,
    memory_max: u64,
) -> Option<String> {
    if signal == Some("SIGSYS") {
        return Some(format!(
            "killed by seccomp (SIGSYS): vm {vm} made a system call its filter forbids"
        ));
    }
    let root = paths.cgroup_root.as_ref()?;
    let now = cgroup::oom_kills(root, vm);
    if now > oom_kills_before {
        return Some(format!(
            "killed by the OOM killer: vm {vm} reached its cgroup's memory.max ({} MiB; \
             {} OOM kill(s) in /{CGROUP_PARENT}/{vm})",
            memory_max >> 20,
            now - oom_kills_before
        ));
    }
    None
}

/// How a running jailed process is jailed, as the kernel reports it (`/proc/<pid>`): its
/// uid and gid, capability sets, no_new_privs, which namespaces differ from init's, its
/// cgroup and its pids (`NSpid`). `None` if the process is gone. `pid` is the service
/// itself ([`keeper::service_of`] the keeper init started).
pub fn observe(pid: i32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("?").to_string())
            .unwrap_or_else(|| "?".into())
    };
    let cap = |name: &str| -> String {
        let v = field(name);
        match u64::from_str_radix(&v, 16) {
            Ok(n) => format!("{n:#x}"),
            Err(_) => v,
        }
    };
    let own: Vec<&str> = ["mnt", "ipc", "uts", "net", "pid"]
        .into_iter()
        .filter(|ns| {
            let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
            mine.is_some() && theirs.is_some() && mine != theirs
        })
        .collect();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_else(|| "?".into());
    // Its pid here and in each namespace below (`NSpid: 4242 1`: PID 1 of its own).
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into());
    Some(format!(
        "uid {} gid {}, CapEff {} CapPrm {} CapBnd {} CapAmb {}, NoNewPrivs {}, own {} \
         namespaces, cgroup {cgroup}, NSpid {nspid}",
        field("Uid:"),
        field("Gid:"),
        cap("CapEff:"),
        cap("CapPrm:"),
        cap("CapBnd:"),
        cap("CapAmb:"),
        field("NoNewPrivs:"),
        if own.is_empty() {
            "no".to_string()
        } else {
            own.join(" ")
        },
    ))
}
