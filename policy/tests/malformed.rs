//! The malformed-policy list of docs/policy.md: every input is rejected with its location,
//! and loading it never replaces a good policy (compile returns an error, nothing else).

use bulkhead_policy::{Diagnostic, PolicyTree, RootDir, ValidateOptions};
use std::path::Path;

fn tree(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PolicyTree) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("policy.d");
    std::fs::create_dir(&root).unwrap();
    for (name, bytes) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let t = PolicyTree::load(&RootDir::staging(&root));
    (dir, t)
}

fn errors_of(t: &PolicyTree) -> Vec<Diagnostic> {
    match t.compile(&ValidateOptions::default()) {
        Ok(_) => panic!("accepted a malformed tree"),
        Err(e) => e.0.into_iter().filter(|d| d.is_error()).collect(),
    }
}

/// Expect an error in `file` at `line:col` whose message contains `needle`.
#[track_caller]
fn reject(files: &[(&str, &[u8])], file: &str, line: u32, col: u32, needle: &str) {
    let (_d, t) = tree(files);
    let errs = errors_of(&t);
    let hit = errs.iter().any(|d| {
        d.path.ends_with(file) && d.line == line && d.col == col && d.message.contains(needle)
    });
    let shown: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
    assert!(
        hit,
        "expected {file}:{line}:{col} {needle:?}, got {shown:#?}"
    );
    // The rendering is path:line:col: error: …
    let s = errs
        .iter()
        .find(|d| d.path.ends_with(file))
        .unwrap()
        .to_string();
    let loc = if line == 0 {
        file.to_string()
    } else {
        format!("{file}:{line}")
    };
    assert!(s.contains(&loc) && s.contains(": error: "), "{s}");
}

const BASE: &[u8] = b"grant gpu-vm provide wayland c2s=memfd:ro s2c=pipe:w\n";

#[test]
fn empty_file_is_a_warning_and_strict_error() {
    let (_d, t) = tree(&[("10-empty.policy", b"")]);
    let c = t.compile(&ValidateOptions::default()).unwrap();
    assert!(c.warnings.iter().any(|w| w.message.contains("empty")));
    assert!(c.policy.rules().is_empty());
    assert!(t
        .compile(&ValidateOptions {
            strict: true,
            ..Default::default()
        })
        .is_err());
}

#[test]
fn garbage_binary_nul_utf8_crlf() {
    reject(
        &[("a.policy", b"\x7fELF\x02\x01\x01\0\0\0")],
        "a.policy",
        1,
        8,
        "NUL",
    );
    reject(
        &[("a.policy", b"version 1\n\xff\xfe garbage\n")],
        "a.policy",
        2,
        1,
        "invalid UTF-8",
    );
    reject(
        &[("a.policy", b"version 1\r\ngroup g a\r\n")],
        "a.policy",
        1,
        10,
        "carriage return",
    );
    reject(
        &[("a.policy", b"lorem ipsum dolor\n")],
        "a.policy",
        1,
        1,
        "unknown keyword",
    );
    reject(
        &[("a.policy", b"version 1\n  \x01\x02\x03\n")],
        "a.policy",
        2,
        3,
        "unknown keyword",
    );
}

#[test]
fn huge_line_and_many_lines() {
    let mut long = b"grant a connect ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 1 << 20));
    reject(&[("a.policy", &long)], "a.policy", 1, 4097, "limit is 4096");
    let many = vec![b'\n'; 1_000_000];
    reject(
        &[("a.policy", &many)],
        "a.policy",
        200_001,
        0,
        "more than 200000 lines",
    );
}

#[test]
fn unknown_words_and_fields() {
    reject(
        &[("a.policy", b"grant a fetch b\n")],
        "a.policy",
        1,
        9,
        "unknown verb",
    );
    reject(
        &[("a.policy", b"grant a provide s c2s=memfd:fly\n")],
        "a.policy",
        1,
        29,
        "unknown right",
    );
    reject(
        &[("a.policy", b"grant a provide s c2s=shm:r\n")],
        "a.policy",
        1,
        23,
        "unknown fd type",
    );
    reject(
        &[("a.policy", b"grant a provide s c2s=pipe:map\n")],
        "a.policy",
        1,
        28,
        "not a right of pipe",
    );
    reject(
        &[(
            "a.policy",
            b"grant a device pci:0000:03:00.0 id=any id=8086:1234\n",
        )],
        "a.policy",
        1,
        40,
        "repeated `id=`",
    );
    reject(
        &[("a.policy", b"grant a\n")],
        "a.policy",
        1,
        8,
        "missing verb",
    );
    reject(
        &[("a.policy", b"grant a connect\n")],
        "a.policy",
        1,
        16,
        "missing service",
    );
    reject(
        &[("a.policy", b"grant a connect s extra\n")],
        "a.policy",
        1,
        19,
        "trailing field",
    );
    reject(
        &[("a.policy", b"version 1 2\n")],
        "a.policy",
        1,
        11,
        "trailing field",
    );
}

#[test]
fn groups_and_includes() {
    reject(
        &[("a.policy", b"grant @ghosts quota vfds=1\n")],
        "a.policy",
        1,
        7,
        "unknown group",
    );
    reject(
        &[("a.policy", b"group g a @g\n")],
        "a.policy",
        1,
        11,
        "is a group",
    );
    reject(
        &[
            ("a.policy", b"include sub/b.policy\n"),
            ("sub/b.policy", b"include a.policy\n"),
        ],
        "sub/b.policy",
        1,
        9,
        "include cycle",
    );
    reject(
        &[("a.policy", b"include ../outside.policy\n")],
        "a.policy",
        1,
        9,
        "`..`",
    );
    reject(
        &[("a.policy", b"include /etc/passwd\n")],
        "a.policy",
        1,
        9,
        "relative",
    );
}

#[test]
fn symlink_out_of_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("policy.d");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("evil.policy"), BASE).unwrap();
    std::os::unix::fs::symlink(dir.path().join("evil.policy"), root.join("10-link.policy"))
        .unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("evil.policy"), root.join("sub/x.policy")).unwrap();
    std::fs::write(root.join("20-inc.policy"), b"include sub/x.policy\n").unwrap();
    let t = PolicyTree::load(&RootDir::staging(&root));
    let errs = errors_of(&t);
    assert!(
        errs.iter()
            .any(|d| d.path.ends_with("10-link.policy")
                && d.message.contains("outside the policy tree")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|d| d.path.ends_with("sub/x.policy")
                && d.message.contains("outside the policy tree")),
        "{errs:?}"
    );
}

#[test]
fn file_names() {
    reject(
        &[("Upper.policy", BASE)],
        "Upper.policy",
        0,
        0,
        "invalid policy file name",
    );
    reject(
        &[("ünï.policy", BASE)],
        "ünï.policy",
        0,
        0,
        "invalid policy file name",
    );
    // Editor leftovers are ignored, not loaded.
    let (_d, t) = tree(&[
        ("10-a.policy", BASE),
        (".10-a.policy.swp", b"\0garbage"),
        ("10-a.policy~", b"\0garbage"),
        ("README", b"x"),
    ]);
    let c = t.compile(&ValidateOptions::default()).unwrap();
    assert_eq!(c.policy.files(), ["10-a.policy"]);
}

#[test]
fn bad_sizes() {
    reject(
        &[("a.policy", b"grant a quota shm=-1\n")],
        "a.policy",
        1,
        19,
        "negative",
    );
    reject(
        &[("a.policy", b"grant a quota shm=18446744073709551616B\n")],
        "a.policy",
        1,
        19,
        "64 bits",
    );
    reject(
        &[("a.policy", b"grant a quota shm=17179869184GiB\n")],
        "a.policy",
        1,
        19,
        "64 bits",
    );
    reject(
        &[("a.policy", b"grant a quota shm=1.5GiB\n")],
        "a.policy",
        1,
        19,
        "fractional",
    );
    reject(
        &[("a.policy", b"grant a quota shm=10GB\n")],
        "a.policy",
        1,
        19,
        "unknown size unit",
    );
    reject(
        &[("a.policy", b"grant a quota shm=4096\n")],
        "a.policy",
        1,
        19,
        "no unit",
    );
}

#[test]
fn bad_bdfs() {
    reject(
        &[("a.policy", b"grant a device pci:0000:03:00.8 id=any\n")],
        "a.policy",
        1,
        16,
        "function 8",
    );
    reject(
        &[("a.policy", b"grant a device pci:03:00.0 id=any\n")],
        "a.policy",
        1,
        16,
        "missing domain",
    );
    reject(
        &[("a.policy", b"grant a device pci:0000:3:00.0 id=any\n")],
        "a.policy",
        1,
        16,
        "bad PCI address",
    );
}

#[test]
fn device_conflicts_and_widening() {
    reject(
        &[
            (
                "10-a.policy",
                b"grant net-vm device pci:0000:03:00.0 id=any\n",
            ),
            (
                "20-b.policy",
                b"grant usb-vm device pci:0000:03:00.0 id=any\n",
            ),
        ],
        "20-b.policy",
        1,
        21,
        "already granted to net-vm at 10-a.policy:1",
    );
    reject(
        &[
            ("10-a.policy", BASE),
            (
                "20-b.policy",
                b"grant x connect wayland s2c=pipe:w,memfd:r\n",
            ),
        ],
        "20-b.policy",
        1,
        25,
        "widens",
    );
}

#[test]
fn a_good_tree_is_not_replaced_by_a_bad_one() {
    let (_d1, good) = tree(&[
        ("10-a.policy", BASE),
        ("20-b.policy", b"grant x connect wayland\n"),
    ]);
    let running = good.compile(&ValidateOptions::default()).unwrap().policy;
    let (_d2, bad) = tree(&[
        ("10-a.policy", BASE),
        ("20-b.policy", b"grant x connect wayland c2s=memfd:rw\n"),
    ]);
    assert!(bad.compile(&ValidateOptions::default()).is_err());
    // The hub keeps `running`; it still decides as before.
    assert!(running.check_connect("x", "wayland", None).is_allowed());
    assert_ne!(good.hash, bad.hash);
    let _ = Path::new("");
}
