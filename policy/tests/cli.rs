//! CLI tests: the built `policyctl` binary on temporary policy trees.

use std::path::{Path, PathBuf};
use std::process::Command;

const BASE: &str = "version 1
group apps browser mail term
grant gpu-vm provide wayland c2s=memfd:ro,dmabuf:ro,pipe:w s2c=memfd:ro,pipe:w max-fds=8
grant clip-vm provide clipboard c2s=pipe:w s2c=pipe:w max-fds=1
grant @apps connect clipboard@clip-vm
";

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
}

fn tree(files: &[(&str, &str)]) -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("policy.d");
    std::fs::create_dir(&root).unwrap();
    for (n, t) in files {
        std::fs::write(root.join(n), t).unwrap();
    }
    let base = dir.path().to_path_buf();
    Tree {
        _dir: dir,
        root,
        base,
    }
}

/// Run policyctl; the hub socket points into the temp dir (no hub) unless overridden.
fn run(t: &Tree, args: &[&str]) -> (i32, String, String) {
    let sock = t.base.join("hub.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_policyctl"));
    cmd.arg("--root")
        .arg(&t.root)
        .arg("--hub-socket")
        .arg(&sock)
        .args(args);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn tree_hash(t: &Tree) -> String {
    let (code, out, _) = run(t, &["--json", "validate"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["tree_hash"].as_str().unwrap().to_string()
}

#[test]
fn help_documents_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_policyctl"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for c in [
        "validate", "grant", "revoke", "deny", "show", "list", "check", "explain", "diff", "apply",
        "status", "log", "fmt", "graph", "bench",
    ] {
        assert!(
            help.contains(&format!("  {c} ")),
            "--help lacks {c}:\n{help}"
        );
        let sub = Command::new(env!("CARGO_BIN_EXE_policyctl"))
            .args([c, "--help"])
            .output()
            .unwrap();
        assert!(sub.status.success(), "{c} --help");
        assert!(
            String::from_utf8_lossy(&sub.stdout).contains("--root"),
            "{c} --help lacks --root"
        );
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_policyctl"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn grant_allows_revoke_denies() {
    let t = tree(&[("10-base.policy", BASE)]);
    assert_eq!(run(&t, &["check", "browser", "connect", "wayland"]).0, 1);
    let (code, out, err) = run(&t, &["grant", "browser", "connect", "wayland@gpu-vm"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("+ browser connect wayland@gpu-vm"), "{out}");
    let local = t.root.join("50-local.policy");
    assert_eq!(read(&local), "grant browser connect wayland@gpu-vm\n");
    let (code, out, _) = run(
        &t,
        &["check", "browser", "connect", "wayland", "--fd", "memfd:rw"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ALLOW"), "{out}");
    assert!(
        out.contains("memfd:read+map (reduced by policy: write dropped)"),
        "{out}"
    );
    // Idempotent.
    let (code, out, _) = run(&t, &["grant", "browser", "connect", "wayland@gpu-vm"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("already granted by 50-local.policy:1"),
        "{out}"
    );
    assert_eq!(read(&local), "grant browser connect wayland@gpu-vm\n");
    // Revoke.
    let (code, out, err) = run(&t, &["revoke", "browser", "connect", "wayland"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("removed 50-local.policy:1"), "{out}");
    let (code, out, _) = run(&t, &["check", "browser", "connect", "wayland"]);
    assert_eq!(code, 1);
    assert!(out.starts_with("DENY"), "{out}");
    // Revoking again is a no-op.
    let (code, out, _) = run(&t, &["revoke", "browser", "connect", "wayland"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to revoke"), "{out}");
}

#[test]
fn deny_beats_grant() {
    let t = tree(&[("10-base.policy", BASE)]);
    assert_eq!(run(&t, &["check", "browser", "connect", "clipboard"]).0, 0);
    let (code, _, err) = run(&t, &["deny", "browser", "connect", "clipboard"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = run(&t, &["check", "browser", "connect", "clipboard"]);
    assert_eq!(code, 1);
    assert!(out.contains("deny beats grant: 50-local.policy:1"), "{out}");
    // mail is unaffected.
    assert_eq!(run(&t, &["check", "mail", "connect", "clipboard"]).0, 0);
    // Removing the deny restores access.
    assert_eq!(
        run(&t, &["revoke", "--deny", "browser", "connect", "clipboard"]).0,
        0
    );
    assert_eq!(run(&t, &["check", "browser", "connect", "clipboard"]).0, 0);
}

#[test]
fn revoke_explains_group_grants_and_changes_nothing() {
    let t = tree(&[("10-base.policy", BASE)]);
    let before = read(&t.root.join("10-base.policy"));
    let (code, out, _) = run(&t, &["revoke", "browser", "connect", "clipboard"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("browser gets this via @apps at 10-base.policy:5"),
        "{out}"
    );
    assert!(
        out.contains("policyctl deny browser connect clipboard"),
        "{out}"
    );
    assert_eq!(read(&t.root.join("10-base.policy")), before);
    assert!(!t.root.join("50-local.policy").exists());
}

#[test]
fn invalid_edits_write_nothing() {
    let t = tree(&[("10-base.policy", BASE)]);
    let (code, _, err) = run(&t, &["grant", "mail", "connect", "wayland", "c2s=memfd:rw"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("50-local.policy:1:") && err.contains("widens"),
        "{err}"
    );
    assert!(!t.root.join("50-local.policy").exists());
    let (code, _, err) = run(&t, &["grant", "net-vm", "provide", "wayland"]);
    assert_eq!(code, 1, "{err}");
    assert!(!t.root.join("50-local.policy").exists());
    // Bad syntax on the command line is a usage error.
    let (code, _, err) = run(&t, &["grant", "mail", "connect", "wayland", "c2s=pipe:map"]);
    assert_eq!(code, 2);
    assert!(err.contains("<command line>:1:"), "{err}");
    // A broken tree refuses edits.
    std::fs::write(t.root.join("20-bad.policy"), "grant a quota shm=10GB\n").unwrap();
    let (code, _, err) = run(&t, &["grant", "mail", "connect", "wayland"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("20-bad.policy:1:19: error: unknown size unit"),
        "{err}"
    );
    assert!(
        err.contains("help: binary units only: did you mean 10GiB?"),
        "{err}"
    );
    assert!(!t.root.join("50-local.policy").exists());
}

#[test]
fn validate_reports_locations_and_json() {
    let t = tree(&[
        ("10-base.policy", BASE),
        (
            "20-x.policy",
            "grant mail connect wayland\ngrant mail frob x\n",
        ),
    ]);
    let (code, _, err) = run(&t, &["validate"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("20-x.policy:2:12: error: unknown verb `frob`"),
        "{err}"
    );
    let (code, out, _) = run(&t, &["--json", "validate"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["line"], 2);
    // validate FILE: the file replaces the tree's file of the same name.
    let fixed = t.base.join("20-x.policy");
    std::fs::write(&fixed, "grant mail connect wayland\n").unwrap();
    let (code, out, err) = run(&t, &["validate", fixed.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: 2 files, 4 rules"), "{out}");
}

/// `--if-match` names the hub's running generation, so checking it needs the hub (the
/// compare against a running hub is in ipc/tests/policyctl.rs); a malformed hash is a usage
/// error before anything is contacted.
#[test]
fn apply_if_match_is_checked_against_the_hub() {
    let old = tree(&[("10-base.policy", BASE)]);
    let new = tree(&[
        ("10-base.policy", BASE),
        ("50-local.policy", "grant browser connect wayland\n"),
    ]);
    let from = old.root.to_str().unwrap();
    let sock = new.base.join("hub.sock");
    let no_hub = format!("no hub control socket at {}", sock.display());
    assert_eq!(run(&new, &["apply", "--if-match", "md5:abc"]).0, 2);
    // The tree in --from is only the diff's base: its hash does not satisfy --if-match.
    let current = tree_hash(&old);
    for args in [
        &["apply", "--from", from, "--if-match", &current][..],
        &["apply", "--dry-run", "--from", from, "--if-match", &current][..],
        &["apply", "--dry-run"][..],
    ] {
        let (code, _, err) = run(&new, args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(&no_hub), "{args:?}: {err}");
    }
}

#[test]
fn apply_dry_run_needs_no_hub_and_shows_the_semantic_diff() {
    let old = tree(&[("10-base.policy", BASE)]);
    let new = tree(&[
        (
            "10-base.policy",
            &BASE.replace("group apps browser mail term", "group apps browser term"),
        ),
        ("50-local.policy", "grant browser connect wayland\n"),
    ]);
    let (code, out, err) = run(
        &new,
        &["apply", "--dry-run", "--from", old.root.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("+ browser connect wayland@gpu-vm"), "{out}");
    assert!(out.contains("- mail connect clipboard@clip-vm"), "{out}");
    assert!(out.contains("- group @apps member mail"), "{out}");
    assert!(out.contains("dry run: nothing applied"), "{out}");
    let (code, out, _) = run(
        &new,
        &["--json", "diff", "--from", old.root.to_str().unwrap()],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|c| c["op"] == "added" && c["what"] == "browser connect wayland@gpu-vm"),
        "{out}"
    );
}

#[test]
fn status_and_log_without_hub_name_the_socket() {
    let t = tree(&[("10-base.policy", BASE)]);
    for cmd in ["status", "log"] {
        let (code, _, err) = run(&t, &[cmd]);
        assert_eq!(code, 1, "{cmd}");
        assert!(
            err.contains(&t.base.join("hub.sock").display().to_string()),
            "{cmd}: {err}"
        );
    }
}

/// A fake hub (a thread answering one Apply over the real SEQPACKET socket and wire
/// format), to test the client side of apply end to end.
#[test]
fn fake_hub_apply_roundtrip() {
    use bulkhead_policy::control::*;
    use nix::sys::socket::{
        accept, bind, listen, recv, send, socket, AddressFamily, Backlog, MsgFlags, SockFlag,
        SockType, UnixAddr,
    };
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let t = tree(&[("10-base.policy", BASE)]);
    let path = t.base.join("hub.sock");
    let lfd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(lfd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&lfd, Backlog::new(1).unwrap()).unwrap();
    // The tree the fake hub says it runs: the base file only.
    let running: Vec<TreeFile> = vec![TreeFile {
        name: "10-base.policy".into(),
        bytes: BASE.as_bytes().to_vec(),
    }];
    let running_hash = bulkhead_policy::PolicyTree::from_files(&[(
        "10-base.policy".to_string(),
        BASE.as_bytes().to_vec(),
    )])
    .hash;
    std::fs::write(
        t.root.join("50-local.policy"),
        "grant browser connect wayland\n",
    )
    .unwrap();
    let expected = tree_hash(&t);
    let hash = running_hash.clone();
    let server = std::thread::spawn(move || {
        let mut reqs = Vec::new();
        // policyctl asks for the running tree, then applies: one connection each.
        for _ in 0..2 {
            let raw = accept(lfd.as_raw_fd()).unwrap();
            // SAFETY: `accept` just returned this fd and nothing else owns it.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut buf = vec![0u8; MAX_MESSAGE];
            let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
            let req = decode_request(&buf[..n]).unwrap();
            let resp = match req.clone() {
                Request::Tree => Response::Tree(RunningTree {
                    generation: 1,
                    tree_hash: hash.clone(),
                    files: running.clone(),
                }),
                Request::Apply { tree_hash, .. } => Response::Applied(ApplyResult {
                    generation: 2,
                    tree_hash,
                    no_longer_allowed: vec![LiveCap {
                        kind: "connection".into(),
                        vm: "mail".into(),
                        description: "mail → clipboard@clip-vm".into(),
                    }],
                    revoked: false,
                }),
                other => panic!("{other:?}"),
            };
            send(
                conn.as_raw_fd(),
                &encode_response(&resp).unwrap(),
                MsgFlags::empty(),
            )
            .unwrap();
            reqs.push(req);
        }
        reqs.pop().unwrap()
    });
    let (code, out, err) = run(&t, &["apply"]);
    let req = server.join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // The diff is from what the hub runs, not from the tree on disk.
    assert!(
        out.contains(&format!("from running generation 1 ({running_hash})")),
        "{out}"
    );
    assert!(out.contains("+ browser connect wayland@gpu-vm"), "{out}");
    assert!(out.contains("applied: generation 2"), "{out}");
    assert!(
        out.contains("no longer allowed: connection mail mail → clipboard@clip-vm"),
        "{out}"
    );
    match req {
        Request::Apply {
            tree_hash,
            root,
            if_match,
            revoke_live,
        } => {
            assert_eq!(tree_hash, expected);
            assert_eq!(root, t.root);
            assert_eq!((if_match, revoke_live), (None, false));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn fake_sysfs_cli_refuses_split_iommu_group() {
    let t = tree(&[(
        "10-dev.policy",
        "grant net-vm device pci:0000:04:00.0 id=10ec:8168\n",
    )]);
    let sys = t.base.join("sys");
    bulkhead_policy::sysfs::build_fake_sysfs(
        &sys,
        &[
            ("0000:04:00.0", 0x10ec, 0x8168, 0x020000, 8),
            ("0000:04:00.1", 0x10ec, 0x8169, 0x020000, 8),
        ],
    )
    .unwrap();
    let s = sys.to_str().unwrap();
    let (code, _, err) = run(&t, &["--sysfs-root", s, "validate"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("10-dev.policy:1: error: IOMMU group 8 is split"),
        "{err}"
    );
    // Granting the other function too makes the group whole — but the edit itself is
    // checked without sysfs; validate then passes.
    assert_eq!(
        run(
            &t,
            &[
                "grant",
                "net-vm",
                "device",
                "pci:0000:04:00.1",
                "id=10ec:8169"
            ]
        )
        .0,
        0
    );
    let (code, out, err) = run(&t, &["--sysfs-root", s, "validate"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn fmt_check_then_fmt() {
    let t = tree(&[("10-base.policy", "grant  gpu-vm provide wayland c2s=pipe:w,memfd:ro # the compositor\ngrant @apps connect wayland\ngroup apps  a b\n")]);
    let (code, out, _) = run(&t, &["fmt", "--check"]);
    assert_eq!(code, 1);
    assert!(out.contains("would reformat"), "{out}");
    let hash = tree_hash(&t);
    assert_eq!(run(&t, &["fmt"]).0, 0);
    let text = read(&t.root.join("10-base.policy"));
    assert!(
        text.contains(
            "grant gpu-vm provide wayland  c2s=memfd:read+map,pipe:write  # the compositor"
        ),
        "{text}"
    );
    assert!(text.contains("grant @apps  connect wayland"), "{text}");
    assert_eq!(run(&t, &["fmt", "--check"]).0, 0);
    assert_ne!(tree_hash(&t), hash);
    // Meaning unchanged.
    assert_eq!(run(&t, &["check", "a", "connect", "wayland"]).0, 0);
}

#[test]
fn show_list_graph_explain() {
    let t = tree(&[
        ("10-base.policy", BASE),
        (
            "20-q.policy",
            "grant @apps quota shm=256MiB\ngrant term quota shm=1GiB\n",
        ),
    ]);
    let (code, out, _) = run(&t, &["show", "term"]);
    assert_eq!(code, 0);
    assert!(out.contains("connect clipboard@clip-vm c2s=pipe:write s2c=pipe:write  (10-base.policy:4, 10-base.policy:5)"), "{out}");
    assert!(out.contains("quota shm=1GiB (20-q.policy:2)"), "{out}");
    let (code, out, _) = run(&t, &["--json", "show", "@apps"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
    let (_, out, _) = run(&t, &["list", "services"]);
    assert!(out.contains("wayland gpu-vm"), "{out}");
    let (_, out, _) = run(&t, &["graph"]);
    assert!(
        out.contains("\"mail\" -> \"clip-vm\" [label=\"clipboard\"]"),
        "{out}"
    );
    let (code, out, _) = run(&t, &["explain", "gpu-vm", "connect", "clipboard"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("nearest miss: grant on 10-base.policy:5 is for @apps; gpu-vm ∉ @apps"),
        "{out}"
    );
    let (code, out, _) = run(
        &t,
        &[
            "check", "mail", "connect", "wayland", "--fd", "dmabuf:r", "--dir", "s2c",
        ],
    );
    assert_eq!(code, 1);
    assert!(out.contains("no rule grants connect to wayland"), "{out}");
    let (code, out, _) = run(&t, &["--json", "check", "mail", "quota"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"value\": 268435456"), "{out}");
}

fn run_with_editor(t: &Tree, script: &str, stdin: &str, args: &[&str]) -> (i32, String, String) {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let ed = t.base.join("editor.sh");
    std::fs::write(&ed, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&ed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_policyctl"))
        .arg("--root")
        .arg(&t.root)
        .arg("--hub-socket")
        .arg(t.base.join("hub.sock"))
        .args(args)
        .env("VISUAL", &ed)
        .env("POLICYCTL", env!("CARGO_BIN_EXE_policyctl"))
        .env("POLICY_ROOT", &t.root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn edit_validates_before_writing() {
    let t = tree(&[("10-base.policy", BASE)]);
    let local = t.root.join("50-local.policy");
    // An invalid edit, then discard: nothing written.
    let (code, _, err) = run_with_editor(
        &t,
        "echo 'grant mail connect wayland c2s=memfd:rw' >> \"$1\"",
        "d\n",
        &["edit"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("widens"), "{err}");
    assert!(!local.exists());
    // A valid edit, then write.
    let (code, out, err) = run_with_editor(
        &t,
        "echo 'grant mail connect wayland' >> \"$1\"",
        "w\n",
        &["edit"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("+ mail connect wayland@gpu-vm"), "{out}");
    assert_eq!(read(&local), "grant mail connect wayland\n");
    // A valid edit, then discard: file unchanged.
    let (code, _, _) = run_with_editor(
        &t,
        "echo 'grant term connect wayland' >> \"$1\"",
        "d\n",
        &["edit"],
    );
    assert_eq!(code, 0);
    assert_eq!(read(&local), "grant mail connect wayland\n");
}

#[test]
fn diff_shows_changed_quotas_and_narrowing() {
    let old = tree(&[
        ("10-base.policy", BASE),
        ("20-q.policy", "grant @apps quota shm=256MiB\n"),
    ]);
    let new = tree(&[
        ("10-base.policy", BASE),
        (
            "20-q.policy",
            "grant @apps quota shm=1GiB\ngrant term connect clipboard s2c=none\n",
        ),
    ]);
    let (code, out, err) = run(&new, &["diff", "--from", old.root.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("~ browser quota shm 256MiB→1GiB"), "{out}");
    assert!(out.contains("~ term connect clipboard@clip-vm c2s=pipe:write s2c=pipe:write max-fds=1→c2s=pipe:write s2c=none max-fds=1"), "{out}");
    assert!(!out.contains("net-vm"), "{out}");
}

#[test]
fn apply_of_an_invalid_tree_never_reaches_the_hub() {
    let t = tree(&[
        ("10-base.policy", BASE),
        ("20-bad.policy", "grant mail connect wayland c2s=memfd:rw\n"),
    ]);
    let (code, _, err) = run(&t, &["apply"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("20-bad.policy:1:28: error: connect widens"),
        "{err}"
    );
    assert!(!err.contains("hub control socket"), "{err}");
}

/// Many `policyctl grant` and `deny` processes on one tree at the same moment: every one of
/// them takes effect (each read-validate-write cycle holds the tree's lock).
#[test]
fn concurrent_grants_and_denies_all_take_effect() {
    let t = tree(&[("10-base.policy", BASE)]);
    let n = 32;
    let children: Vec<std::process::Child> = (0..n)
        .map(|i| {
            let verb = if i % 4 == 3 { "deny" } else { "grant" };
            Command::new(env!("CARGO_BIN_EXE_policyctl"))
                .arg("--root")
                .arg(&t.root)
                .args([verb, &format!("vm{i}"), "connect", "clipboard@clip-vm"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "policyctl #{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = read(&t.root.join("50-local.policy"));
    let mut missing = Vec::new();
    for i in 0..n {
        let verb = if i % 4 == 3 { "deny" } else { "grant" };
        let line = format!("{verb} vm{i} connect clipboard@clip-vm");
        if !text.lines().any(|l| l == line) {
            missing.push(line);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {n} edits were lost: {missing:?}\n{text}",
        missing.len()
    );
    assert_eq!(text.lines().count(), n, "{text}");
    // Then revokes and fmt at the same moment as more grants: all take effect too.
    let children: Vec<std::process::Child> = (0..n)
        .map(|i| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_policyctl"));
            cmd.arg("--root").arg(&t.root);
            match i % 4 {
                0 => cmd.args(["revoke", &format!("vm{i}"), "connect", "clipboard"]),
                1 => cmd.args(["fmt"]),
                2 => cmd.args(["grant", &format!("late{i}"), "connect", "clipboard@clip-vm"]),
                _ => cmd.args([
                    "revoke",
                    "--deny",
                    &format!("vm{i}"),
                    "connect",
                    "clipboard",
                ]),
            };
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "policyctl #{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = read(&t.root.join("50-local.policy"));
    let words: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for i in 0..n {
        let has = |verb: &str, who: &str| {
            words
                .iter()
                .any(|w| w.len() == 4 && w[0] == verb && w[1] == who && w[3] == "clipboard@clip-vm")
        };
        match i % 4 {
            0 | 3 => assert!(
                !has("grant", &format!("vm{i}")) && !has("deny", &format!("vm{i}")),
                "vm{i} not revoked:\n{text}"
            ),
            1 => assert!(has("grant", &format!("vm{i}")), "vm{i} lost:\n{text}"),
            _ => {
                assert!(has("grant", &format!("vm{i}")), "vm{i} lost:\n{text}");
                assert!(has("grant", &format!("late{i}")), "late{i} lost:\n{text}");
            }
        }
    }
}

/// `edit` refuses to write over a file that changed while the editor was open (here,
/// another `policyctl grant` from inside the editor), and loses neither change: the other
/// grant stays, the edited copy is kept and named.
#[test]
fn a_stale_edit_is_refused_and_loses_nothing() {
    let t = tree(&[
        ("10-base.policy", BASE),
        ("50-local.policy", "grant mail connect wayland\n"),
    ]);
    let local = t.root.join("50-local.policy");
    let (code, out, err) = run_with_editor(
        &t,
        "echo 'grant term connect wayland' >> \"$1\"\n\
         \"$POLICYCTL\" --root \"$POLICY_ROOT\" grant browser connect wayland >/dev/null",
        "w\n",
        &["edit"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("changed since"), "{err}");
    let text = read(&local);
    assert!(text.contains("grant browser connect wayland"), "{text}");
    assert!(!text.contains("term"), "{text}");
    let kept = err
        .split("your version is in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no kept copy named: {err}"));
    let kept = kept.trim_end_matches([';', ':', ',']);
    assert!(
        read(Path::new(kept)).contains("grant term connect wayland"),
        "{kept}"
    );
}
