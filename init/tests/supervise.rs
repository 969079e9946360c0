//! The real event loop, supervisor, output pipes, signals and control socket, run as
//! `bulkhead-init supervise` (a child subreaper instead of PID 1) with real /bin/sh
//! services. Waits are for log lines, each with a generous deadline; nothing here
//! depends on how fast the machine is.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::Signal;

mod common;
use common::Init;

const BIN: &str = common::INIT;

/// Runs one of init's client commands against `init`'s socket.
fn client_of(init: &Init, cmd: &str) -> (i32, String, String) {
    client(cmd, &init.socket)
}

fn client(cmd: &str, socket: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg(cmd)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn crashing_service_backs_off_then_fails_at_the_burst_limit() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "poweroff"

[[service]]
name = "crashy"
exec = ["/bin/sh", "-c", "echo out-line; echo err-line >&2; exit 3"]
restart = "on-failure"
restart_delay_ms = 20
restart_delay_max_ms = 1000
burst = 3
burst_interval_ms = 600000
"#,
        false,
    );
    init.expect("bulkhead-init: ready");
    init.expect("bulkhead-init: started crashy pid");
    // A run's output comes before the news of its exit.
    init.expect("crashy: out-line");
    init.expect("crashy: err-line");
    init.expect("bulkhead-init: crashy exited with status 3");
    init.expect("bulkhead-init: crashy restarting in 20 ms");
    init.expect("(start 2)");
    init.expect("bulkhead-init: crashy restarting in 40 ms");
    init.expect("(start 3)");
    init.expect("bulkhead-init: crashy failed: start limit reached (3 starts in 600000 ms)");
    init.expect("bulkhead-init: all services ended");
    init.expect("bulkhead-init: powering off");
    assert_eq!(init.wait_exit(), 0);
    assert!(!init.seen.iter().any(|l| l.contains("(start 4)")));
}

#[test]
fn stop_in_reverse_order_and_sigkill_a_service_that_ignores_sigterm() {
    let mut init = Init::start(
        r#"
[[service]]
name = "stubborn"
exec = ["/bin/sh", "-c", "trap '' TERM; echo armed; while :; do sleep 1; done"]
stop_timeout_ms = 300

[[service]]
name = "polite"
exec = ["/bin/sleep", "1000"]
"#,
        false,
    );
    // Both start lines come before any output is drained.
    init.expect("started polite");
    init.expect("stubborn: armed");
    init.signal(Signal::SIGTERM);
    init.expect("bulkhead-init: received SIGTERM");
    init.expect("bulkhead-init: shutdown started (reboot)");
    // Reverse start order: polite first.
    init.expect("bulkhead-init: polite killed by signal SIGTERM");
    init.expect("bulkhead-init: stubborn did not stop after SIGTERM, sending SIGKILL");
    init.expect("bulkhead-init: stubborn killed by signal SIGKILL");
    // The final word comes last, after every service is gone.
    init.expect("bulkhead-init: rebooting");
    assert_eq!(init.wait_exit(), 0);
    assert!(!init.seen.iter().any(|l| l.contains("restarting")));
}

#[test]
fn signals_map_to_actions() {
    for (sig, msg) in [
        (Signal::SIGUSR2, "powering off"),
        (Signal::SIGPWR, "powering off"),
        (Signal::SIGUSR1, "halting"),
        (Signal::SIGINT, "rebooting"),
    ] {
        let mut init = Init::start("", false);
        init.expect("bulkhead-init: ready");
        // SIGHUP means nothing to init.
        init.signal(Signal::SIGHUP);
        init.signal(sig);
        init.expect(&format!("bulkhead-init: {msg}"));
        assert_eq!(init.wait_exit(), 0);
    }
}

#[test]
fn children_get_an_empty_signal_mask_default_dispositions_and_a_clean_env() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "poweroff"

[[service]]
name = "mask"
exec = ["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]
restart = "never"

[[service]]
name = "env"
exec = ["/usr/bin/env"]
restart = "never"

[[service]]
name = "custom-env"
exec = ["/usr/bin/env"]
restart = "never"
env = { A = "1", B = "two words" }
"#,
        false,
    );
    init.expect("bulkhead-init: all services ended");
    assert_eq!(init.wait_exit(), 0);
    let lines_of = |name: &str| -> Vec<String> {
        let prefix = format!("{name}: ");
        let mut v: Vec<String> = init
            .seen
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect();
        v.sort();
        v
    };
    let mask = lines_of("mask");
    let field = |name: &str| -> u64 {
        let line = mask.iter().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line.split('\t').nth(1).unwrap().trim(), 16).unwrap()
    };
    // Init itself blocks everything and Rust ignores SIGPIPE in init: none of it may leak.
    assert_eq!(field("SigBlk:"), 0, "{mask:?}");
    // Signals 32 and 33 are glibc's own (SIGCANCEL, SIGSETXID): glibc refuses to change
    // them, so whatever the test runner's environment did to them is inherited.
    let glibc_reserved = (1u64 << 31) | (1u64 << 32);
    assert_eq!(field("SigIgn:") & !glibc_reserved, 0, "{mask:?}");
    assert_eq!(lines_of("env"), vec!["PATH=/bin"]);
    assert_eq!(lines_of("custom-env"), vec!["A=1", "B=two words"]);
}

#[test]
fn control_socket_status_and_poweroff() {
    let mut init = Init::start(
        r#"
[[service]]
name = "sleeper"
exec = ["/bin/sleep", "1000"]
"#,
        false,
    );
    let started = init.expect("bulkhead-init: started sleeper pid");
    let pid = started
        .split("pid ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let (code, out, err) = client_of(&init, "status");
    assert_eq!(code, 0, "{err}");
    let row = out.lines().find(|l| l.starts_with("sleeper")).unwrap();
    assert!(row.contains("running"), "{out}");
    assert!(row.contains(&pid), "{out}");
    let (code, _, err) = client_of(&init, "poweroff");
    assert_eq!(code, 0, "{err}");
    init.expect("bulkhead-init: control socket: Poweroff requested");
    init.expect("bulkhead-init: shutdown started (poweroff)");
    init.expect("bulkhead-init: sleeper killed by signal SIGTERM");
    init.expect("bulkhead-init: powering off");
    assert_eq!(init.wait_exit(), 0);
    // The socket is gone with its server: the client reports an error.
    let (code, _, err) = client_of(&init, "status");
    assert_eq!(code, 1);
    assert!(err.contains("init.sock"), "{err}");
}

#[test]
fn broken_config_runs_no_services_and_stays() {
    let mut init = Init::start(
        r#"
[[service]]
name = "x"
exec = ["/bin/true"]
restrat = "never"
"#,
        false,
    );
    let e = init.expect("restrat");
    assert!(e.starts_with("bulkhead-init: "), "{e}");
    init.expect("bulkhead-init: configuration rejected: running with no services");
    init.expect("bulkhead-init: ready");
    init.expect("bulkhead-init: all services ended");
    // Stays up (when_idle defaults to "stay") and still answers.
    let (code, out, _) = client_of(&init, "status");
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    init.signal(Signal::SIGUSR2);
    init.expect("bulkhead-init: powering off");
    assert_eq!(init.wait_exit(), 0);
}

#[test]
fn missing_program_counts_as_a_failed_start() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "poweroff"

[[service]]
name = "ghost"
exec = ["/nonexistent/prog"]
restart_delay_ms = 1
burst = 2
"#,
        false,
    );
    init.expect("bulkhead-init: ghost could not start");
    init.expect("bulkhead-init: ghost restarting in 1 ms");
    init.expect("bulkhead-init: ghost failed: start limit reached (2 starts in 60000 ms)");
    init.expect("bulkhead-init: powering off");
    assert_eq!(init.wait_exit(), 0);
}

#[test]
fn client_help_works() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["status", "poweroff", "reboot"] {
        assert!(text.contains(cmd), "{text}");
    }
}

/// `[hub]` and `vm =`: init makes one SOCK_SEQPACKET channel per VM, starts the hub first
/// with `--vm NAME=FD` for each, hands each VMM its own end as fd 3 with `BULKHEAD_HUB_FD`,
/// and closes its copy of a VMM's end once that service has ended for good, so the hub
/// reads EOF. A plain service gets no extra descriptor. (Shell stand-ins for the hub and the
/// VMMs: what is tested is init's plumbing, with real sockets.)
#[test]
fn hub_channels_are_made_and_handed_over() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "stay"

[hub]
user = 65534
read_only = ["/bin", "/lib", "/lib64", "/usr"]
nofile = 1024
exec = ["/bin/sh", "-c", "for a in \"$@\"; do echo \"arg $a\"; done; cat <&3; echo; echo eof-a; cat <&4; echo; echo eof-b; sleep 1000", "hub"]

[[service]]
name = "vm-a"
vm = "a"
user = 2001
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo fd=$BULKHEAD_HUB_FD vm=$BULKHEAD_VM; printf one-record-from-a >&3"]
restart = "never"

[[service]]
name = "vm-b"
vm = "b"
user = 2002
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo fd=$BULKHEAD_HUB_FD vm=$BULKHEAD_VM; printf one-record-from-b >&3"]
restart = "never"

[[service]]
name = "plain"
exec = ["/bin/sh", "-c", "if [ -e /dev/fd/3 ]; then echo has-fd-3; else echo no-fd-3; fi; echo hub-fd=${BULKHEAD_HUB_FD:-unset}"]
restart = "never"
"#,
        false,
    );
    init.expect("hub: eof-b");
    for want in [
        "hub: arg --vm",
        "hub: arg a=3",
        "hub: arg b=4",
        "vm-a: fd=3 vm=a",
        "vm-b: fd=3 vm=b",
        "hub: one-record-from-a",
        "hub: eof-a",
        "hub: one-record-from-b",
        "plain: no-fd-3",
        "plain: hub-fd=unset",
    ] {
        // Lines of different children arrive in any order: wait for those not seen yet.
        if !init.seen.iter().any(|l| l.ends_with(want)) {
            init.expect(want);
        }
    }
    let started = |name: &str| {
        init.seen
            .iter()
            .position(|l| l.contains(&format!("started {name} pid")))
    };
    assert!(started("hub") < started("vm-a"), "{:?}", init.seen);
    // The hub still runs, but it is there for the VMs: with them all ended, the machine
    // is idle (the supervisor's unit tests cover `when_idle` with a support process).
    if !init.seen.iter().any(|l| l.ends_with("all services ended")) {
        init.expect("bulkhead-init: all services ended");
    }
    client_of(&init, "poweroff");
    assert_eq!(init.wait_exit(), 0);
}

/// The jail around a VM's service (needs root, like init): its own user and group, no
/// capability in any set (init reads the kernel's view of the running child and says so),
/// no_new_privs, /dev/kvm as a descriptor, a root that holds only the paths it was given
/// (read-only), its own hostname (UTS namespace), no network interface but loopback, the
/// limits set in the child, and the descriptors of `fds`: a file init opened and one end
/// of a socketpair whose other end another service holds. (A shell stands in for the VMM:
/// what is tested is init's jail, on a real child.)
#[test]
fn a_vm_service_runs_jailed_with_only_what_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, "DISK-CONTENTS\n").unwrap();
    let mut init = Init::start(
        &format!(
            r#"
[host]
when_idle = "poweroff"

[[service]]
name = "vmm"
vm = "jailed"
user = 65534
group = 65533
read_only = ["/bin", "/lib", "/lib64", "/usr"]
fds = [{{ open = "{disk}", arg = "--disk-fd={{fd}}" }}, {{ socketpair = "link", arg = "--link={{fd}}" }}]
exec = ["/bin/sh", "-c", "echo args=$*; echo uid=$(id -u) gid=$(id -g) groups=$(id -G); for d in /etc /proc /sys /dev /tmp /run /bin; do [ -e $d ] && echo has $d; done; echo host=$(hostname); echo kvm=$BULKHEAD_KVM_FD; echo nofile=$(ulimit -n) core=$(ulimit -c) memlock=$(ulimit -l); if touch /x 2>&-; then echo root-writable; else echo root-read-only; fi; if [ -e {disk} ]; then echo disk-path-visible; else echo disk-path-hidden; fi; cat <&4; echo pid=$$; read p <&5; echo \"signal the peer: $(kill -0 $p 2>&1 || true)\"; echo hello-from-the-jail >&5; echo done", "vmm"]
restart = "never"

[[service]]
name = "peer"
fds = [{{ socketpair = "link", arg = "{{fd}}" }}]
exec = ["/bin/sh", "-c", "echo $$ >&$1; head -n 1 <&$1", "peer"]
restart = "never"
"#,
            disk = disk.display()
        ),
        false,
    );
    for want in [
        "vmm: args=--disk-fd=4 --link=5",
        "vmm: uid=65534 gid=65533 groups=65533",
        "vmm: has /bin",
        "vmm: host=jailed",
        "vmm: kvm=3",
        "vmm: nofile=4096 core=0 memlock=64",
        "vmm: root-read-only",
        "vmm: disk-path-hidden",
        "vmm: DISK-CONTENTS",
        // PID 1 of its own PID namespace; another process's pid (the peer sent its own)
        // names nothing there: ESRCH, where before it was EPERM (the process was visible,
        // only the uid check refused).
        "vmm: pid=1",
        "vmm: signal the peer: vmm: 1: kill: No such process",
        "peer: hello-from-the-jail",
    ] {
        if !init.seen.iter().any(|l| l.ends_with(want)) {
            init.expect(want);
        }
    }
    assert_whole_line(&init, "vmm: pid=", "vmm: pid=1");
    // Init's own view of the child, from /proc: every capability set empty (bounding and
    // ambient included), no_new_privs, the five namespaces of its own, PID 1 in its own.
    let jailed = init
        .seen
        .iter()
        .find(|l| l.contains("vmm jailed: "))
        .cloned()
        .unwrap_or_else(|| panic!("no jailed line: {:?}", init.seen));
    for want in [
        "uid 65534",
        "gid 65533",
        "CapEff 0x0 CapPrm 0x0 CapBnd 0x0 CapAmb 0x0",
        "NoNewPrivs 1",
        "own mnt ipc uts net pid namespaces",
    ] {
        assert!(jailed.contains(want), "{want} not in {jailed}");
    }
    let nspid: Vec<&str> = jailed
        .split("NSpid ")
        .nth(1)
        .and_then(|r| r.split(" (").next())
        .map(|r| r.split(' ').collect())
        .unwrap_or_default();
    assert_eq!(nspid.len(), 2, "{jailed}");
    assert_eq!(nspid.get(1), Some(&"1"), "{jailed}");
    if !init.seen.iter().any(|l| l.ends_with("vmm: done")) {
        init.expect("vmm: done");
    }
    for hidden in ["/etc", "/proc", "/sys", "/dev", "/tmp", "/run"] {
        let line = format!("vmm: has {hidden}");
        assert!(!init.seen.iter().any(|l| l.ends_with(&line)), "{line}");
    }
    assert_eq!(init.wait_exit(), 0);
}

/// The line seen with `prefix` ends with `want` (not merely contains it: `pid=1` is in
/// `pid=1234`).
fn assert_whole_line(init: &Init, prefix: &str, want: &str) {
    let line = init
        .seen
        .iter()
        .find(|l| l.contains(prefix))
        .cloned()
        .unwrap_or_default();
    assert!(line.ends_with(want), "{line:?} is not {want:?}");
}

/// A jailed service is PID 1 of its own PID namespace, and init supervises it as before
/// through its keeper (`jail::keeper`): at init's SIGTERM (the shutdown's stop), a service
/// that leaves SIGTERM at its default action (the hub; here `sleep`) ends at once, killed
/// by SIGTERM as init reports it (the kernel drops that signal for a namespace's PID 1, so
/// without the keeper it would have waited for its stop timeout's SIGKILL, longer than
/// this test waits); one that catches it (a VMM presses its guest's power button; here a
/// shell's trap) gets it and its exit status reaches init; an exit status and a death by
/// signal reach init as the service's own.
#[test]
fn jailed_services_in_their_own_pid_namespace_are_supervised_as_before() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "poweroff"

[[service]]
name = "quiet"
vm = "quiet"
user = 65531
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo pid=$$; exec sleep 600"]
restart = "never"
stop_timeout_ms = 600000

[[service]]
name = "trapper"
vm = "trapper"
user = 65530
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "trap 'echo got-term; exit 3' TERM; echo pid=$$; while :; do sleep 0.1; done"]
restart = "never"
stop_timeout_ms = 600000

[[service]]
name = "ends"
vm = "ends"
user = 65529
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo pid=$$; exit 7"]
restart = "never"

[[service]]
name = "killed"
vm = "killed"
user = 65528
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo pid=$$; exec sleep 600"]
restart = "never"
"#,
        false,
    );
    for want in [
        "quiet: pid=1",
        "trapper: pid=1",
        "ends: pid=1",
        "killed: pid=1",
    ] {
        if !init.seen.iter().any(|l| l.ends_with(want)) {
            init.expect(want);
        }
        let (prefix, _) = want.split_at(want.len() - 1);
        assert_whole_line(&init, prefix, want);
    }
    if !init
        .seen
        .iter()
        .any(|l| l.contains("bulkhead-init: ends exited with status 7"))
    {
        init.expect("bulkhead-init: ends exited with status 7");
    }
    // A signal from outside that the keeper does not stand in for (SIGKILL reaches a
    // namespace's PID 1 from an ancestor): init sees the service's death by it.
    let killed = init
        .seen
        .iter()
        .find(|l| l.contains("killed jailed: "))
        .cloned()
        .unwrap_or_else(|| panic!("no jailed line: {:?}", init.seen));
    let pid: i32 = killed
        .split("NSpid ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no NSpid in {killed}"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    init.expect("bulkhead-init: killed killed by signal SIGKILL");
    init.signal(Signal::SIGTERM);
    init.expect("trapper: got-term");
    for want in [
        "bulkhead-init: quiet killed by signal SIGTERM",
        "bulkhead-init: trapper exited with status 3",
    ] {
        if !init.seen.iter().any(|l| l.contains(want)) {
            init.expect(want);
        }
    }
    assert_eq!(init.wait_exit(), 0);
}

/// The hub's jail holds what its memfd server needs: `/proc/self/fd`, through which it makes
/// a second (read-only) description of each memfd it hands out, from a procfs of its own
/// PID namespace (where it is alone). Before, the hub's root had
/// no `/proc`, and every shared-memory allocation in a jailed hub failed (the example
/// desktop's windows never came: "hub refused 4096 bytes of shared memory").
#[test]
fn the_hubs_jail_lets_it_reopen_its_own_descriptors_through_proc() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("hub-run");
    let mut init = Init::start(
        &format!(
            r#"
[host]
when_idle = "poweroff"

[hub]
user = 65532
# The machine running the tests may not let root raise the hard limit to the hub's 65536.
nofile = 1024
runtime_dir = "{run}"
read_only = ["/bin", "/lib", "/lib64", "/usr"]
exec = ["/bin/sh", "-c", "echo uid=$(id -u); exec 8</bin/sh; if [ \"$(head -c 4 /proc/self/fd/8 2>&- | wc -c)\" = 4 ]; then echo reopened-through-proc; fi; if touch /proc/x 2>&-; then echo proc-writable; else echo proc-read-only; fi; set -- /proc/[0-9]*; echo proc-pids=$*; echo done; sleep 30"]

[[service]]
name = "waiter"
exec = ["/bin/sleep", "30"]
restart = "never"
"#,
            run = run.display()
        ),
        false,
    );
    for want in [
        "hub: uid=65532",
        "hub: reopened-through-proc",
        "hub: proc-read-only",
        "hub: done",
    ] {
        if !init.seen.iter().any(|l| l.ends_with(want)) {
            init.expect(want);
        }
    }
    // Its /proc is its own PID namespace's: itself, PID 1, and nothing else of the host.
    let pids = init
        .seen
        .iter()
        .find(|l| l.contains("hub: proc-pids="))
        .cloned()
        .unwrap_or_default();
    assert!(pids.ends_with("hub: proc-pids=/proc/1"), "{pids}");
    let jailed = init
        .seen
        .iter()
        .find(|l| l.contains("hub jailed: "))
        .cloned()
        .unwrap_or_else(|| panic!("no jailed line: {:?}", init.seen));
    assert!(
        jailed.contains("CapEff 0x0 CapPrm 0x0 CapBnd 0x0 CapAmb 0x0"),
        "{jailed}"
    );
}

/// A VM's service whose jail cannot be built does not start: a path it names that does not
/// exist is refused with the path, counted as a failed start.
#[test]
fn a_jail_that_cannot_be_built_is_a_failed_start() {
    let mut init = Init::start(
        r#"
[host]
when_idle = "poweroff"

[[service]]
name = "vmm"
vm = "broken"
user = 65534
read_only = ["/does/not/exist"]
exec = ["/bin/true"]
restart = "never"
"#,
        false,
    );
    init.expect("vmm could not start: jail: /does/not/exist");
    assert_eq!(init.wait_exit(), 0);
}

#[test]
fn hub_and_vm_names_are_validated() {
    for (toml, want) in [
        (
            "[hub]\nexec = []\n",
            "[hub]: exec is empty",
        ),
        (
            "[hub]\nexec = [\"/bin/true\"]\n[[service]]\nname = \"hub\"\nexec = [\"/bin/true\"]\n",
            "named \"hub\"",
        ),
        (
            "[[service]]\nname = \"x\"\nvm = \"a\"\nuser = 2001\nexec = [\"/bin/true\"]\n[[service]]\nname = \"y\"\nvm = \"a\"\nuser = 2002\nexec = [\"/bin/true\"]\n",
            "vm \"a\" is run by another service too",
        ),
        (
            "[[service]]\nname = \"x\"\nvm = \"A!\"\nexec = [\"/bin/true\"]\n",
            "vm \"A!\" must match",
        ),
    ] {
        let err = bulkhead_init::config::SystemConfig::parse(toml, Path::new("system.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{toml}: {err}");
    }
}
