//! The jail, checked from the emulated host (L1) and attacked from inside:
//!
//! - `jail-check NAME…` (runs as root on L1, unjailed): for each NAME (a VM's name, or
//!   `hub`), finds the jailed process in cgroup `/bulkhead/NAME`: the child of the keeper
//!   init started (`init/src/jail/keeper.rs`), PID 1 of its own PID namespace; and reads
//!   the kernel's view of it: `/proc/<pid>/status` of every thread (CapEff, CapPrm, CapBnd,
//!   CapAmb 0, NoNewPrivs 1, Seccomp 2, its uid, not root, not another's, `NSpid` ending in
//!   1), its namespaces (pid included) against init's, its cgroup. Waits (bounded) until
//!   each has installed its filters.
//! - `escape-probe` (runs under the same jail init builds for a VMM, without a VMM's seccomp
//!   filter: the jail's layers on their own): tries to open host files, reach the network,
//!   find (kill -0 on every pid) and ptrace every process it can see (none: it is PID 1 of
//!   its own PID namespace), mount, fork past pids.max, and finally allocate past
//!   memory.max (init reports the OOM kill).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

type Res = Result<String, String>;

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|| "?".into())
}

/// pid → (cgroup path, status), for every process.
fn processes() -> BTreeMap<i32, (String, String)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) {
            out.insert(pid, (path.to_string(), status));
        }
    }
    out
}

/// The jailed process of cgroup `want`: the child of a process init started (its keeper,
/// ppid 1) in the same cgroup.
fn jailed_in(procs: &BTreeMap<i32, (String, String)>, want: &str) -> Option<i32> {
    let keepers: Vec<String> = procs
        .iter()
        .filter(|(_, (cg, st))| cg == want && status_field(st, "PPid:") == "1")
        .map(|(pid, _)| pid.to_string())
        .collect();
    procs
        .iter()
        .find(|(_, (cg, st))| cg == want && keepers.contains(&status_field(st, "PPid:")))
        .map(|(pid, _)| *pid)
}

/// One process's jail as the kernel reports it; Err names what is wrong (or not yet there).
fn inspect(name: &str, pid: i32) -> Result<(u32, String), String> {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("tasks: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut uid = 0u32;
    for tid in &tasks {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
            .map_err(|e| format!("task {tid}: {e}"))?;
        for f in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "CapInh:"] {
            if u64::from_str_radix(&status_field(&s, f), 16) != Ok(0) {
                return Err(format!("task {tid}: {f} {}", status_field(&s, f)));
            }
        }
        if status_field(&s, "NoNewPrivs:") != "1" {
            return Err(format!(
                "task {tid}: NoNewPrivs {}",
                status_field(&s, "NoNewPrivs:")
            ));
        }
        if status_field(&s, "Seccomp:") != "2" {
            return Err(format!(
                "task {tid}: Seccomp {}",
                status_field(&s, "Seccomp:")
            ));
        }
        uid = status_field(&s, "Uid:")
            .parse()
            .map_err(|_| "no uid".to_string())?;
        if uid == 0 {
            return Err(format!("task {tid}: runs as root"));
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("status: {e}"))?;
    let nspid: Vec<String> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    if nspid.len() != 2 || nspid.last().map(String::as_str) != Some("1") {
        return Err(format!(
            "NSpid {nspid:?}: not PID 1 of a namespace of its own"
        ));
    }
    let mut own = Vec::new();
    for ns in ["mnt", "ipc", "uts", "net", "pid"] {
        let init = std::fs::read_link(format!("/proc/1/ns/{ns}")).map_err(|e| e.to_string())?;
        let it = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).map_err(|e| e.to_string())?;
        if init == it {
            return Err(format!("shares init's {ns} namespace"));
        }
        own.push(ns);
    }
    let want = format!("/bulkhead/{name}");
    Ok((
        uid,
        format!(
            "uid {uid}, CapEff/CapPrm/CapBnd/CapAmb/CapInh 0, NoNewPrivs 1, Seccomp 2 on all {} threads, own {} namespaces, NSpid {}, cgroup {want}",
            tasks.len(),
            own.join(" "),
            nspid.join(" ")
        ),
    ))
}

/// `jail-check NAME…`.
pub fn check(names: &[String]) -> Res {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done: BTreeMap<String, (u32, String)> = BTreeMap::new();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while done.len() < names.len() && Instant::now() < deadline {
        let procs = processes();
        for name in names {
            if done.contains_key(name) {
                continue;
            }
            let want = format!("/bulkhead/{name}");
            let Some(pid) = jailed_in(&procs, &want) else {
                last.insert(
                    name.clone(),
                    format!("no keeper's child in cgroup {want} yet"),
                );
                continue;
            };
            match inspect(name, pid) {
                Ok(r) => {
                    println!("testprog: jail-check: {name} pid {pid}: {}: PASS", r.1);
                    done.insert(name.clone(), r);
                }
                Err(e) => {
                    last.insert(name.clone(), format!("pid {pid}: {e}"));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if done.len() < names.len() {
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !done.contains_key(*n))
            .map(|n| format!("{n}: {}", last.get(n).map(String::as_str).unwrap_or("?")))
            .collect();
        return Err(format!("FAIL jail-check: {}", missing.join("; ")));
    }
    let mut uids: Vec<u32> = done.values().map(|(u, _)| *u).collect();
    uids.sort();
    uids.dedup();
    if uids.len() != done.len() {
        return Err("FAIL jail-check: two jailed processes share a uid".into());
    }
    Ok(format!(
        "PASS jail-check: {} jailed processes, each its own uid",
        done.len()
    ))
}

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// `escape-probe`: every attempt must fail; the last (memory) ends in the OOM killer.
pub fn probe() -> Res {
    let mut escaped = Vec::new();
    // 1. Host files by path: init's configuration, init itself, a device, another's /proc.
    for path in [
        "/etc/bulkhead/system.toml",
        "/init",
        "/dev/kvm",
        "/proc/1/environ",
        "/run/bulkhead/init.sock",
    ] {
        match std::fs::File::open(path) {
            Ok(_) => escaped.push(format!("opened {path}")),
            Err(e) => println!("testprog: escape-probe: open {path}: refused ({e})"),
        }
    }
    // 2. The network: an AF_INET socket exists only in its own namespace, with no route.
    // SAFETY: socket/connect on a local sockaddr; the fd is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            println!(
                "testprog: escape-probe: socket(AF_INET): refused ({})",
                errno()
            );
        } else {
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 22u16.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_be_bytes([10, 0, 2, 2]).to_be(),
                },
                sin_zero: [0; 8],
            };
            let r = libc::connect(
                fd,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            if r == 0 {
                escaped.push("connected to 10.0.2.2:22".into());
            } else {
                println!(
                    "testprog: escape-probe: socket(AF_INET) connect 10.0.2.2:22: refused ({})",
                    errno()
                );
            }
            libc::close(fd);
        }
    }
    // 3. Find every other process (kill -0: ESRCH is "no such process here"), ptrace each.
    //    In its own PID namespace it is PID 1 and there is none.
    let mut seen = 0;
    let mut attached = 0;
    for pid in 1..32768 {
        // SAFETY: kill with signal 0 only checks; ptrace on a pid; detached if attached.
        unsafe {
            if libc::kill(pid, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            {
                continue;
            }
            if pid as u32 == std::process::id() {
                continue;
            }
            seen += 1;
            if libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) == 0 {
                attached += 1;
                libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
            }
        }
    }
    if attached > 0 {
        escaped.push(format!("ptrace-attached {attached} processes"));
    }
    if seen > 0 || std::process::id() != 1 {
        escaped.push(format!(
            "sees {seen} other processes as pid {} (no PID namespace of its own)",
            std::process::id()
        ));
    } else {
        println!(
            "testprog: escape-probe: pid namespace: it is pid 1 and no other pid answers kill -0"
        );
    }
    println!("testprog: escape-probe: ptrace: attached to {attached} of the {seen} other processes it can see");
    // 4. mount.
    // SAFETY: mount with literals.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 {
        escaped.push("mounted a tmpfs on /".into());
    } else {
        println!("testprog: escape-probe: mount: refused ({})", errno());
    }
    // 5. fork past pids.max: children pause until killed.
    let mut kids = Vec::new();
    let stop = loop {
        // SAFETY: the child only pauses (async-signal-safe) until killed.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: pause has no arguments.
                unsafe { libc::pause() };
            },
            pid if pid > 0 => {
                kids.push(pid);
                if kids.len() > 4096 {
                    break "no limit".to_string();
                }
            }
            _ => break errno(),
        }
    };
    for k in &kids {
        // SAFETY: kill and waitpid on our own children.
        unsafe {
            libc::kill(*k, libc::SIGKILL);
            libc::waitpid(*k, std::ptr::null_mut(), 0);
        }
    }
    if kids.len() > 4096 {
        escaped.push("forked 4096 processes".into());
    } else {
        println!(
            "testprog: escape-probe: fork: stopped after {} children ({stop})",
            kids.len()
        );
    }
    if !escaped.is_empty() {
        return Err(format!("FAIL escape-probe: {}", escaped.join("; ")));
    }
    println!("testprog: escape-probe: PASS: every attempt refused; now allocating past memory.max");
    // 6. Memory until the cgroup's OOM killer ends this process.
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    for _ in 0..4096 {
        hoard.push(vec![0xa5; 16 << 20]);
    }
    Err(format!(
        "FAIL escape-probe: allocated {} MiB",
        hoard.len() * 16
    ))
}
