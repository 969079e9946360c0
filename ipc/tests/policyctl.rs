//! `policyctl apply` against a real `bulkhead-hub` process: the diff is from the hub's
//! running generation (which it exports over its control socket), and `--if-match` is
//! compared with that generation's hash, not with the tree on disk. The commands run
//! in-process through `bulkhead_policy::cli` (the `policyctl` binary only dispatches to it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use bulkhead_policy::cli::{self, Ctx};
use bulkhead_policy::control::{HubClient, Request, Response, StatusInfo};
use bulkhead_policy::diff::Change;
use bulkhead_policy::{PolicyTree, RootDir, ValidateOptions};

const BASE: &str = "version 1
group apps browser mail term
grant gpu-vm provide wayland c2s=memfd:ro,pipe:w s2c=memfd:ro,pipe:w max-fds=8
grant clip-vm provide clipboard c2s=pipe:w s2c=pipe:w max-fds=1
grant @apps connect clipboard@clip-vm
";

struct Hub {
    child: Child,
    _dir: tempfile::TempDir,
    policy: PathBuf,
    socket: PathBuf,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hub {
    fn start(base: &str) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.d");
        std::fs::create_dir(&policy).unwrap();
        std::fs::write(policy.join("10-base.policy"), base).unwrap();
        let socket = dir.path().join("hub.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-hub"));
        cmd.arg("--policy-dir")
            .arg(&policy)
            .arg("--control-socket")
            .arg(&socket)
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .stdin(Stdio::null())
            .env("RUST_LOG", "warn");
        if nix::unistd::geteuid().is_root() {
            cmd.arg("--allow-root");
        }
        let mut child = cmd.spawn().unwrap();
        // Readiness: the control socket answers (bounded, not a timing assertion).
        for _ in 0..3000 {
            if HubClient::connect(&socket).is_ok() {
                break;
            }
            if let Some(s) = child.try_wait().unwrap() {
                panic!("bulkhead-hub exited: {s}");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Hub {
            child,
            _dir: dir,
            policy,
            socket,
        }
    }

    fn status(&self) -> StatusInfo {
        match HubClient::connect(&self.socket)
            .unwrap()
            .request(&Request::Status)
            .unwrap()
        {
            Response::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            json: false,
            opts: ValidateOptions::default(),
            sysfs: PathBuf::from("/nonexistent/sys"),
            force: false,
            hub: self.socket.clone(),
            root: Some(self.policy.clone()),
        }
    }
}

fn tree_hash(dir: &Path) -> String {
    PolicyTree::load(&RootDir::staging(dir)).hash
}

fn shown(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|c| c.to_string()).collect()
}

#[test]
fn apply_diffs_from_the_running_generation_and_if_match_compares_with_it() {
    let hub = Hub::start(BASE);
    let cx = hub.ctx();
    let first = hub.status();
    assert_eq!(first.generation, 1);
    assert_eq!(first.tree_hash, tree_hash(&hub.policy));

    // Nothing changed yet: nothing to show.
    let plan = cli::apply::plan(&cx, None, None).unwrap();
    assert!(plan.changes.is_empty(), "{:?}", shown(&plan.changes));
    assert_eq!(
        plan.base,
        format!("running generation 1 ({})", first.tree_hash)
    );

    // A grant on disk, not yet applied: the diff from the running generation shows it.
    std::fs::write(
        hub.policy.join("50-local.policy"),
        "grant browser connect wayland@gpu-vm\n",
    )
    .unwrap();
    let on_disk = tree_hash(&hub.policy);
    assert_ne!(on_disk, first.tree_hash);
    let plan = cli::apply::plan(&cx, None, None).unwrap();
    assert_eq!(
        shown(&plan.changes),
        ["+ browser connect wayland@gpu-vm c2s=memfd:read+map,pipe:write s2c=memfd:read+map,pipe:write max-fds=8"],
    );
    assert_eq!(plan.tree_hash, on_disk);

    // --if-match names the running generation: the tree on disk's own hash is refused (it
    // is not what runs), a made-up one too, and nothing is applied.
    for stale in [on_disk.clone(), format!("sha256:{}", "0".repeat(64))] {
        assert_eq!(cli::apply::run(&cx, false, Some(&stale), false, None), 1);
        assert_eq!(
            hub.status().generation,
            1,
            "applied despite --if-match {stale}"
        );
    }
    // The running generation's hash passes, and the swap happens.
    assert_eq!(
        cli::apply::run(&cx, false, Some(&first.tree_hash), false, None),
        0
    );
    let second = hub.status();
    assert_eq!(second.generation, 2);
    assert_eq!(second.tree_hash, on_disk);
    // The old hash is stale now.
    assert_eq!(
        cli::apply::run(&cx, false, Some(&first.tree_hash), false, None),
        1
    );
    assert_eq!(hub.status().generation, 2);
    let plan = cli::apply::plan(&cx, None, None).unwrap();
    assert!(plan.changes.is_empty(), "{:?}", shown(&plan.changes));
    assert_eq!(
        plan.base,
        format!("running generation 2 ({})", second.tree_hash)
    );
}

/// A hub that booted with a bad tree runs the deny-all generation 0: the diff shows every
/// rule of the tree about to be applied as new.
#[test]
fn apply_diffs_from_deny_all_when_the_hub_runs_generation_0() {
    let hub = Hub::start("version 1\ngrant a frobnicate\n");
    assert_eq!(hub.status().generation, 0);
    std::fs::write(hub.policy.join("10-base.policy"), BASE).unwrap();
    let plan = cli::apply::plan(&hub.ctx(), None, None).unwrap();
    let shown = shown(&plan.changes);
    assert!(
        shown
            .iter()
            .any(|c| c.starts_with("+ mail connect clipboard@clip-vm")),
        "{shown:?}"
    );
    assert!(
        plan.base.starts_with("running generation 0 "),
        "{}",
        plan.base
    );
}
