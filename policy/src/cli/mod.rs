//! `policyctl`'s commands, one file per command; the binary (`src/bin/policyctl.rs`) only
//! parses the command line and calls the command's `run`. Every `run` prints its own
//! output (text, or JSON with `--json`) and returns the exit code.

pub mod apply;
pub mod bench;
pub mod check;
pub mod diff;
pub mod edit;
pub mod fmt;
pub mod grant;
pub mod graph;
pub mod hub;
pub mod list;
pub mod log;
pub mod revoke;
pub mod show;
pub mod status;
pub mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Severity};
use crate::{sysfs, Compiled, Policy, PolicyTree, RootDir, ValidateOptions};

/// What every command shares: the global options.
pub struct Ctx {
    /// Print machine-readable JSON on stdout.
    pub json: bool,
    /// Validation options (`--strict`, `--known-vms`, the host's RAM).
    pub opts: ValidateOptions,
    /// The sysfs to read PCI devices from.
    pub sysfs: PathBuf,
    /// Allow host-critical devices.
    pub force: bool,
    /// The hub's policy control socket.
    pub hub: PathBuf,
    /// A staging tree instead of the installed one.
    pub root: Option<PathBuf>,
}

/// Exit code: ok / allow.
pub const OK: u8 = 0;
/// Exit code: errors / deny.
pub const FAIL: u8 = 1;
/// Exit code: usage error.
pub const USAGE: u8 = 2;

/// The host's physical RAM (for the quota warnings).
pub fn phys_ram() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

pub(crate) fn print_diags(cx: &Ctx, diags: &[Diagnostic]) {
    if cx.json {
        return;
    }
    for d in diags {
        eprintln!("{d}");
    }
}

impl Ctx {
    pub(crate) fn roots(&self, dir: Option<&Path>) -> Vec<RootDir> {
        match dir.or(self.root.as_deref()) {
            Some(d) => RootDir::staging(d),
            None => RootDir::defaults(),
        }
    }

    /// Load and compile a tree, printing errors (no sysfs checks).
    pub(crate) fn load(&self, roots: &[RootDir]) -> Result<(PolicyTree, Compiled), u8> {
        self.load_overrides(roots, &HashMap::new(), false)
    }

    /// Load and compile a tree, printing errors; with `devices`, the sysfs device checks too
    /// (validate and apply).
    pub(crate) fn load_overrides(
        &self,
        roots: &[RootDir],
        ov: &HashMap<PathBuf, Vec<u8>>,
        devices: bool,
    ) -> Result<(PolicyTree, Compiled), u8> {
        let tree = PolicyTree::load_with_overrides(roots, ov);
        match tree.compile(&self.opts) {
            Ok(c) if !devices => Ok((tree, c)),
            Ok(mut c) => {
                let mut dev = sysfs::check_devices(&c.policy, &self.sysfs, self.force);
                if self.opts.strict {
                    for d in &mut dev {
                        d.severity = Severity::Error;
                    }
                }
                if dev.iter().any(|d| d.is_error()) {
                    let mut all = c.warnings.clone();
                    all.extend(dev);
                    all.sort();
                    self.fail_diags(&tree, &all);
                    return Err(FAIL);
                }
                c.warnings.extend(dev);
                Ok((tree, c))
            }
            Err(d) => {
                self.fail_diags(&tree, &d.0);
                Err(FAIL)
            }
        }
    }

    fn fail_diags(&self, tree: &PolicyTree, diags: &[Diagnostic]) {
        let errors: Vec<&Diagnostic> = diags.iter().filter(|d| d.is_error()).collect();
        if self.json {
            print_json(&serde_json::json!({
                "ok": false,
                "tree_hash": tree.hash,
                "errors": errors,
                "warnings": diags.iter().filter(|d| !d.is_error()).collect::<Vec<_>>(),
            }));
        } else {
            print_diags(self, diags);
            eprintln!(
                "error: policy is invalid ({} errors); nothing was changed",
                errors.len()
            );
        }
    }
}

/// Loads and compiles the tree in `dir` (or the context's), printing its warnings.
pub(crate) fn load_current(cx: &Ctx, dir: Option<&Path>) -> Result<Policy, u8> {
    let roots = cx.roots(dir);
    cx.load(&roots).map(|(_, c)| {
        print_diags(cx, &c.warnings);
        c.policy
    })
}
