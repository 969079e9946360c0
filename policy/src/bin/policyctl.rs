//! `policyctl`: edit, check and apply Bulkhead policy. See `policyctl --help` and
//! docs/policy.md.

use bulkhead_policy::ast::{Action, Effect, Subject};
use bulkhead_policy::control::{HubClient, LogFilter, Request, Response, HUB_SOCKET};
use bulkhead_policy::diag::{Diagnostic, Severity};
use bulkhead_policy::edit::{add_rule, remove_rule, AddOutcome, RuleKey};
use bulkhead_policy::explain::{
    explain_connect, explain_device, explain_provide, show_vm, Explanation, TransferQuery,
};
use bulkhead_policy::parse::{parse_bdf, parse_caps, parse_rule_text};
use bulkhead_policy::{
    bench, diff, edit, fmt as pfmt, sysfs, Compiled, Direction, Policy, PolicyTree, RootDir,
    ValidateOptions,
};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Edit, check and apply Bulkhead policy.
///
/// Policy is line rules in /etc/bulkhead/policy.d/*.policy (plus transient rules in
/// /run/bulkhead/policy.d): default deny, union of grants, deny always wins, order never
/// matters. Exit codes: 0 ok / allow, 1 errors / deny, 2 usage.
#[derive(Parser, Debug)]
#[command(name = "policyctl", version, max_term_width = 100)]
struct Cli {
    /// Use this policy directory (a staging tree) instead of /etc/bulkhead/policy.d plus
    /// /run/bulkhead/policy.d.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Read PCI devices and IOMMU groups from this sysfs (for tests and other hosts).
    #[arg(long, global = true, value_name = "DIR", default_value = sysfs::SYSFS_ROOT)]
    sysfs_root: PathBuf,
    /// Treat warnings (dead denies, unknown VMs and services) as errors.
    #[arg(long, global = true)]
    strict: bool,
    /// Allow host-critical devices (host bridge, boot display) in device grants.
    #[arg(long, global = true)]
    force: bool,
    /// The VMs that exist (comma-separated); others are reported as unknown.
    #[arg(long, global = true, value_delimiter = ',', value_name = "VM,...")]
    known_vms: Option<Vec<String>>,
    /// The hub's policy control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = HUB_SOCKET)]
    hub_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Parse and check the whole tree (with FILEs: as if they replaced or joined the tree's
    /// files of the same name). Prints `path:line:col: error: …` with `help:` lines.
    Validate {
        /// Files to check together with the tree.
        files: Vec<PathBuf>,
    },
    /// Append a grant line (canonical form) to --file, after checking the new tree validates.
    /// Idempotent. Example: `policyctl grant browser connect wayland@gpu-vm`.
    Grant(EditArgs),
    /// Append a deny line (deny always beats grant). Example: `policyctl deny browser connect
    /// clipboard`.
    Deny(EditArgs),
    /// Remove the grant lines `SUBJ VERB OBJ` from the tree. If the access still comes from a
    /// group, @any or another file, says so and exits 1 instead of silently doing nothing.
    Revoke {
        /// SUBJ VERB [OBJ], e.g. `browser connect wayland`.
        #[arg(required = true, num_args = 2..=3)]
        words: Vec<String>,
        /// Remove deny lines instead of grant lines.
        #[arg(long)]
        deny: bool,
    },
    /// Effective permissions after group expansion, with file:line: of a VM, an @group or a
    /// service (all VMs when omitted).
    Show {
        /// VM, @group or service.
        what: Option<String>,
    },
    /// List devices, services, quotas, groups, VMs or rules.
    List {
        /// What to list.
        #[arg(value_enum, default_value = "rules")]
        what: ListWhat,
    },
    /// Evaluate SRC VERB OBJ: prints ALLOW/DENY, the final rights, the matching grants, the
    /// winning deny, the quota and, on a deny, the nearest miss. Exit 0 allow, 1 deny.
    Check(CheckArgs),
    /// Same as check (the explanation is always printed).
    Explain(CheckArgs),
    /// Semantic diff per VM (+ added, - removed, ~ changed), not a text diff.
    Diff {
        /// The old tree: a directory (default: the installed tree).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// The new tree: a directory (default: --root or the installed tree).
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// Validate, show the diff, then ask the hub to swap generations atomically. Lists live
    /// capabilities the new policy no longer allows.
    Apply {
        /// Validate and diff only; contact nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse unless the current tree hashes to this (compare-and-swap; checked here
        /// first, then by the hub against its running generation).
        #[arg(long, value_name = "sha256:HEX")]
        if_match: Option<String>,
        /// Tear down live capabilities the new policy no longer allows.
        #[arg(long)]
        revoke_live: bool,
        /// The current tree to diff against (default: the installed tree).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
    },
    /// visudo-like: edit a copy of FILE in $EDITOR, validate the tree with it, then
    /// (e)dit again / (d)iscard / (w)rite / (a)pply (write and apply).
    Edit {
        /// The file in the first policy directory.
        #[arg(default_value = "50-local.policy")]
        file: String,
    },
    /// The hub's running generation, tree hash, files, last rejected apply.
    Status,
    /// The hub's audit log (JSON lines with --json).
    Log {
        /// Only denials.
        #[arg(long)]
        denied: bool,
        /// Only this source VM.
        #[arg(long, value_name = "VM")]
        vm: Option<String>,
        /// Keep printing new records.
        #[arg(long)]
        follow: bool,
        /// Start at this sequence number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        since: u64,
    },
    /// Rewrite files in canonical form: aligned columns, aliases expanded, comments kept.
    Fmt {
        /// Only report files that would change (exit 1 if any).
        #[arg(long)]
        check: bool,
    },
    /// Graphviz graph of who may connect to whom.
    Graph {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
    },
    /// Measure check_connect/check_transfer cost with 10, 1 000 and 100 000 rules against a
    /// linear-scan evaluator (build with --release).
    Bench {
        /// Tree sizes in rules.
        #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
        sizes: Vec<usize>,
        /// Checks per size.
        #[arg(long, default_value_t = 1_000_000)]
        iterations: usize,
    },
}

#[derive(clap::Args, Debug)]
struct EditArgs {
    /// SUBJ VERB OBJ [key=value…], e.g. `browser connect wayland@gpu-vm`.
    #[arg(required = true, num_args = 2..)]
    words: Vec<String>,
    /// The file (in the first policy directory) to append to.
    #[arg(long, default_value = "50-local.policy")]
    file: String,
    /// Also apply the new tree to the running hub.
    #[arg(long)]
    apply: bool,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The source VM.
    src: String,
    /// connect, device, provide or quota.
    verb: String,
    /// The object: SERVICE[@PROVIDER] or pci:DDDD:BB:DD.F (none for quota).
    obj: Option<String>,
    /// Also check sending an fd of this type with these rights, e.g. memfd:rw.
    #[arg(long, value_name = "TYPE:RIGHTS")]
    fd: Option<String>,
    /// Direction of the --fd transfer.
    #[arg(long, value_enum, default_value = "c2s")]
    dir: DirArg,
    /// Number of fds in the message.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Evaluate against this tree instead of --root / the installed tree.
    #[arg(long, value_name = "DIR")]
    against: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DirArg {
    C2s,
    S2c,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ListWhat {
    Devices,
    Services,
    Quotas,
    Groups,
    Vms,
    Rules,
}

struct Ctx {
    json: bool,
    opts: ValidateOptions,
    sysfs: PathBuf,
    force: bool,
    hub: PathBuf,
    root: Option<PathBuf>,
}

/// Exit codes.
const OK: u8 = 0;
const FAIL: u8 = 1;
const USAGE: u8 = 2;

fn phys_ram() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON: {e}"),
    }
}

fn print_diags(cx: &Ctx, diags: &[Diagnostic]) {
    if cx.json {
        return;
    }
    for d in diags {
        eprintln!("{d}");
    }
}

impl Ctx {
    fn roots(&self, dir: Option<&Path>) -> Vec<RootDir> {
        match dir.or(self.root.as_deref()) {
            Some(d) => RootDir::staging(d),
            None => RootDir::defaults(),
        }
    }

    /// Load and compile a tree, printing errors (no sysfs checks).
    fn load(&self, roots: &[RootDir]) -> Result<(PolicyTree, Compiled), u8> {
        self.load_overrides(roots, &HashMap::new(), false)
    }

    /// Load and compile a tree, printing errors; with `devices`, the sysfs device checks too
    /// (validate and apply).
    fn load_overrides(
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let cx = Ctx {
        json: cli.json,
        opts: ValidateOptions {
            strict: cli.strict,
            known_vms: cli.known_vms.map(|v| v.into_iter().collect()),
            phys_ram: phys_ram(),
        },
        sysfs: cli.sysfs_root,
        force: cli.force,
        hub: cli.hub_socket,
        root: cli.root,
    };
    let code = match cli.cmd {
        Cmd::Validate { files } => validate(&cx, &files),
        Cmd::Grant(a) => add(&cx, Effect::Grant, &a),
        Cmd::Deny(a) => add(&cx, Effect::Deny, &a),
        Cmd::Revoke { words, deny } => revoke(&cx, &words, deny),
        Cmd::Show { what } => show(&cx, what.as_deref()),
        Cmd::List { what } => list(&cx, what),
        Cmd::Check(a) | Cmd::Explain(a) => check(&cx, &a),
        Cmd::Diff { from, to } => diff_cmd(&cx, from.as_deref(), to.as_deref()),
        Cmd::Apply {
            dry_run,
            if_match,
            revoke_live,
            from,
        } => apply(
            &cx,
            dry_run,
            if_match.as_deref(),
            revoke_live,
            from.as_deref(),
        ),
        Cmd::Edit { file } => edit_cmd(&cx, &file),
        Cmd::Status => status(&cx),
        Cmd::Log {
            denied,
            vm,
            follow,
            since,
        } => log_cmd(&cx, denied, vm, follow, since),
        Cmd::Fmt { check } => fmt_cmd(&cx, check),
        Cmd::Graph { service } => graph(&cx, service.as_deref()),
        Cmd::Bench { sizes, iterations } => bench_cmd(&cx, &sizes, iterations),
    };
    ExitCode::from(code)
}

fn validate(cx: &Ctx, files: &[PathBuf]) -> u8 {
    let roots = cx.roots(None);
    let mut ov = HashMap::new();
    for f in files {
        let Some(root) = roots.first() else {
            return USAGE;
        };
        let Some(name) = f.file_name() else {
            eprintln!("error: {} is not a file", f.display());
            return USAGE;
        };
        match std::fs::read(f) {
            Ok(b) => {
                ov.insert(root.path.join(name), b);
            }
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", f.display());
                return FAIL;
            }
        }
    }
    match cx.load_overrides(&roots, &ov, true) {
        Err(code) => code,
        Ok((tree, c)) => {
            if cx.json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "tree_hash": tree.hash,
                    "files": tree.files.iter().map(|f| &f.name).collect::<Vec<_>>(),
                    "rules": c.policy.rules().len(),
                    "errors": [],
                    "warnings": c.warnings,
                }));
            } else {
                print_diags(cx, &c.warnings);
                println!(
                    "ok: {} files, {} rules, {} warnings; tree {}",
                    tree.files.len(),
                    c.policy.rules().len(),
                    c.warnings.len(),
                    tree.hash
                );
            }
            OK
        }
    }
}

fn add(cx: &Ctx, effect: Effect, a: &EditArgs) -> u8 {
    let text = format!("{effect} {}", a.words.join(" "));
    let rule = match parse_rule_text(&text) {
        Ok(r) => r,
        Err(d) => {
            eprintln!("{d}");
            return USAGE;
        }
    };
    let roots = cx.roots(None);
    match add_rule(&roots, &a.file, &rule, &cx.opts) {
        Ok(AddOutcome::AlreadyPresent(at)) => {
            let verb = if effect == Effect::Grant {
                "granted"
            } else {
                "denied"
            };
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "already-present", "rule": rule.to_string(), "at": at}),
                );
            } else {
                println!("already {verb} by {at}: {rule}");
            }
            if a.apply {
                return apply(cx, false, None, false, None);
            }
            OK
        }
        Ok(AddOutcome::Added(e)) => {
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "added", "rule": rule.to_string(), "files": e.files, "changes": e.changes, "warnings": e.warnings}),
                );
            } else {
                print_diags(cx, &e.warnings);
                for f in &e.files {
                    println!("{}: + {rule}", f.display());
                }
                for c in &e.changes {
                    println!("{c}");
                }
                if e.changes.is_empty() {
                    println!("(no change in effective permissions)");
                }
            }
            if a.apply {
                return apply(cx, false, None, false, None);
            }
            OK
        }
        Err(e) => edit_error(cx, e),
    }
}

fn edit_error(cx: &Ctx, e: edit::EditError) -> u8 {
    if cx.json {
        let diags = match &e {
            edit::EditError::TreeInvalid(d) | edit::EditError::WouldBeInvalid(d) => d.0.clone(),
            _ => Vec::new(),
        };
        print_json(
            &serde_json::json!({"status": "error", "message": e.to_string(), "errors": diags}),
        );
    } else {
        eprintln!("error: {e}");
    }
    FAIL
}

fn revoke(cx: &Ctx, words: &[String], deny: bool) -> u8 {
    let effect = if deny { Effect::Deny } else { Effect::Grant };
    let key = if words.get(1).map(String::as_str) == Some("quota") {
        if words.len() > 2 {
            eprintln!("error: revoke takes SUBJ quota (no parameters)");
            return USAGE;
        }
        let subject = match parse_rule_text(&format!(
            "grant {} quota vfds=0",
            words.first().map_or("", |s| s.as_str())
        )) {
            Ok(r) => r.subject,
            Err(d) => {
                eprintln!("{d}");
                return USAGE;
            }
        };
        RuleKey {
            effect,
            subject,
            action: Action::Quota {
                shm: None,
                shm_count: None,
                vfds: None,
            },
        }
    } else {
        match parse_rule_text(&format!("deny {}", words.join(" "))) {
            Ok(r) => RuleKey {
                effect,
                subject: r.subject,
                action: r.action,
            },
            Err(mut d) => {
                d.help = Some("revoke takes SUBJ VERB OBJ, without parameters".into());
                eprintln!("{d}");
                return USAGE;
            }
        }
    };
    let roots = cx.roots(None);
    match remove_rule(&roots, &key, &cx.opts) {
        Err(e) => edit_error(cx, e),
        Ok(r) => {
            let what = format!(
                "{} {} {}",
                key.subject,
                key.action.verb(),
                key.action.object()
            );
            if cx.json {
                print_json(&serde_json::json!({
                    "removed": r.removed,
                    "changes": r.edited.as_ref().map(|e| &e.changes),
                    "still_granted": r.still_granted,
                }));
            } else {
                for at in &r.removed {
                    println!("removed {at}");
                }
                if let Some(e) = &r.edited {
                    for c in &e.changes {
                        println!("{c}");
                    }
                }
                if r.removed.is_empty() && r.still_granted.is_empty() {
                    println!(
                        "nothing to revoke: no line `{} {what}`",
                        if deny { "deny" } else { "grant" }
                    );
                }
                for s in &r.still_granted {
                    println!("note: {s}");
                }
                if !r.still_granted.is_empty() {
                    println!("access remains; use `policyctl deny {what}` or edit the group or file named above");
                }
            }
            if r.still_granted.is_empty() {
                OK
            } else {
                FAIL
            }
        }
    }
}

fn load_current(cx: &Ctx, dir: Option<&Path>) -> Result<Policy, u8> {
    let roots = cx.roots(dir);
    cx.load(&roots).map(|(_, c)| {
        print_diags(cx, &c.warnings);
        c.policy
    })
}

fn print_explanation(cx: &Ctx, ex: &Explanation) {
    if cx.json {
        print_json(ex);
        return;
    }
    println!("{} {}", if ex.allowed { "ALLOW" } else { "DENY" }, ex.query);
    if let Some(g) = &ex.granted {
        println!("  granted: {g}");
    }
    for m in &ex.matching {
        println!("  grant: {m}");
    }
    for d in &ex.winning_deny {
        println!("  deny:  {d}");
    }
    if !ex.allowed {
        for m in &ex.nearest_miss {
            println!("  nearest miss: {m}");
        }
        if let Some(r) = &ex.reason {
            println!("  audit reason: {r}");
        }
    }
    for q in &ex.quota {
        println!("  quota: {q}");
    }
}

fn check(cx: &Ctx, a: &CheckArgs) -> u8 {
    if a.against.as_deref() == Some(Path::new("running")) {
        eprintln!("error: --against running needs a check request in the hub's control protocol, which it does not have yet; use --against DIR");
        return USAGE;
    }
    let p = match load_current(cx, a.against.as_deref()) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let obj = a.obj.as_deref().unwrap_or("");
    let ex = match a.verb.as_str() {
        "connect" => {
            let (service, provider) = match obj.split_once('@') {
                Some((s, p)) => (s, Some(p)),
                None => (obj, None),
            };
            let transfer = match &a.fd {
                None => None,
                Some(spec) => match parse_caps(spec).ok().and_then(|c| {
                    let mut e = c.entries();
                    let first = e.next();
                    if e.next().is_some() {
                        None
                    } else {
                        first
                    }
                }) {
                    Some((fd_type, rights)) => Some(TransferQuery {
                        fd_type,
                        rights,
                        dir: match a.dir {
                            DirArg::C2s => Direction::C2s,
                            DirArg::S2c => Direction::S2c,
                        },
                        count: a.count,
                    }),
                    None => {
                        eprintln!("error: --fd takes one TYPE:RIGHTS, e.g. memfd:rw or pipe:write");
                        return USAGE;
                    }
                },
            };
            explain_connect(&p, &a.src, service, provider, transfer)
        }
        "device" => match parse_bdf(obj) {
            Ok(b) => explain_device(&p, &a.src, b),
            Err(e) => {
                eprintln!("error: {e}");
                return USAGE;
            }
        },
        "provide" => explain_provide(&p, &a.src, obj),
        "quota" => {
            let q = p.quota_for(&a.src);
            if cx.json {
                print_json(&q);
            } else {
                println!(
                    "{} quota: shm={} shm-count={} vfds={}",
                    a.src,
                    bulkhead_policy::ast::format_size(q.shm.value),
                    q.shm_count.value,
                    q.vfds.value
                );
                for (k, v) in [
                    ("shm", &q.shm),
                    ("shm-count", &q.shm_count),
                    ("vfds", &q.vfds),
                ] {
                    println!(
                        "  {k} from {}",
                        v.from
                            .as_ref()
                            .map_or("nothing (default 0)".into(), |r| r.to_string())
                    );
                }
            }
            return OK;
        }
        other => {
            eprintln!("error: unknown verb `{other}` (connect, device, provide or quota)");
            return USAGE;
        }
    };
    print_explanation(cx, &ex);
    if ex.allowed {
        OK
    } else {
        FAIL
    }
}

fn show(cx: &Ctx, what: Option<&str>) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let print_vm = |vm: &str| {
        let r = show_vm(&p, vm);
        if cx.json {
            print_json(&r);
            return;
        }
        println!(
            "{vm}{}",
            if r.groups.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.groups.join(" "))
            }
        );
        for l in r.connects.iter().chain(&r.provides).chain(&r.devices) {
            println!("  {l}");
        }
        for d in &r.denies {
            println!("  {d}");
        }
        for q in &r.quota {
            println!("  quota {q}");
        }
    };
    match what {
        None => {
            for vm in p.known_vms() {
                print_vm(vm);
            }
            print_vm(diff::ANY_VM);
        }
        Some(g) if g.starts_with('@') && g != "@any" => {
            let name = g.trim_start_matches('@');
            let Some(def) = p.groups().get(name) else {
                eprintln!("error: no group {g}");
                return FAIL;
            };
            let rules: Vec<String> = p
                .rules()
                .iter()
                .filter(|e| e.rule.subject == Subject::Group(name.into()))
                .map(|e| format!("{}: {}", e.at, e.rule))
                .collect();
            if cx.json {
                print_json(
                    &serde_json::json!({"group": name, "members": def.members, "defined_at": def.defined_at, "rules": rules}),
                );
            } else {
                println!(
                    "{g}: {}  ({})",
                    def.members.iter().cloned().collect::<Vec<_>>().join(" "),
                    def.defined_at
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                for r in rules {
                    println!("  {r}");
                }
            }
        }
        Some(s) if p.provider(s).is_some() => {
            let Some(prov) = p.provider(s) else {
                return FAIL;
            };
            let mut who = Vec::new();
            for vm in p
                .known_vms()
                .iter()
                .map(String::as_str)
                .chain([diff::ANY_VM])
            {
                if let Ok(c) = p.check_connect(vm, s, None).outcome {
                    who.push(format!(
                        "{vm} c2s={} s2c={}  ({})",
                        c.c2s,
                        c.s2c,
                        c.rules
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            if cx.json {
                print_json(&serde_json::json!({"service": s, "provider": prov, "clients": who}));
            } else {
                println!(
                    "{s}: provided by {} c2s={} s2c={} max-fds={}  ({})",
                    prov.vm, prov.c2s, prov.s2c, prov.max_fds, prov.at
                );
                for w in who {
                    println!("  {w}");
                }
            }
        }
        Some(vm) => print_vm(vm),
    }
    OK
}

fn list(cx: &Ctx, what: ListWhat) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let lines: Vec<String> = match what {
        ListWhat::Devices => p
            .all_devices()
            .iter()
            .map(|(vm, d)| {
                format!(
                    "pci:{} {vm} id={}{}  ({})",
                    d.bdf,
                    d.id,
                    if d.shared {
                        " shared=exclusive-run"
                    } else {
                        ""
                    },
                    d.at
                )
            })
            .collect(),
        ListWhat::Services => p
            .services()
            .iter()
            .map(|(s, pr)| {
                format!(
                    "{s} {} c2s={} s2c={} max-fds={}  ({})",
                    pr.vm, pr.c2s, pr.s2c, pr.max_fds, pr.at
                )
            })
            .collect(),
        ListWhat::Quotas => p
            .known_vms()
            .iter()
            .map(String::as_str)
            .chain([diff::ANY_VM])
            .map(|vm| {
                let q = p.quota_for(vm);
                format!(
                    "{vm} shm={} shm-count={} vfds={}",
                    bulkhead_policy::ast::format_size(q.shm.value),
                    q.shm_count.value,
                    q.vfds.value
                )
            })
            .collect(),
        ListWhat::Groups => p
            .groups()
            .iter()
            .map(|(g, d)| {
                format!(
                    "@{g} {}",
                    d.members.iter().cloned().collect::<Vec<_>>().join(" ")
                )
            })
            .collect(),
        ListWhat::Vms => p.known_vms().iter().cloned().collect(),
        ListWhat::Rules => {
            let mut v: Vec<_> = p.rules().iter().collect();
            v.sort_by(|a, b| a.at.cmp(&b.at));
            v.iter().map(|e| format!("{}: {}", e.at, e.rule)).collect()
        }
    };
    if cx.json {
        print_json(&lines);
    } else {
        for l in lines {
            println!("{l}");
        }
    }
    OK
}

fn diff_cmd(cx: &Ctx, from: Option<&Path>, to: Option<&Path>) -> u8 {
    if from == Some(Path::new("running")) {
        eprintln!("error: --from running needs the hub to export its tree, which it does not yet; use --from DIR");
        return USAGE;
    }
    let old = match from {
        Some(d) => load_current(cx, Some(d)),
        None => cx.load(&RootDir::defaults()).map(|(_, c)| c.policy),
    };
    let (Ok(old), Ok(new)) = (old, load_current(cx, to)) else {
        return FAIL;
    };
    let changes = diff::diff(&old, &new);
    if cx.json {
        print_json(&changes);
    } else {
        for c in &changes {
            println!("{c}");
        }
    }
    OK
}

fn valid_hash(h: &str) -> bool {
    h.strip_prefix("sha256:").is_some_and(|x| {
        x.len() == 64
            && x.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    })
}

fn apply(
    cx: &Ctx,
    dry_run: bool,
    if_match: Option<&str>,
    revoke_live: bool,
    from: Option<&Path>,
) -> u8 {
    if let Some(h) = if_match {
        if !valid_hash(h) {
            eprintln!("error: --if-match takes sha256:<64 lowercase hex digits>, as printed by `policyctl validate` or `status`");
            return USAGE;
        }
    }
    let roots = cx.roots(None);
    let (tree, new) = match cx.load_overrides(&roots, &HashMap::new(), true) {
        Ok(x) => x,
        Err(c) => return c,
    };
    print_diags(cx, &new.warnings);
    let from_roots = match from {
        Some(d) => RootDir::staging(d),
        None => RootDir::defaults(),
    };
    let from_tree = PolicyTree::load(&from_roots);
    // Compare-and-swap, first step: refuse a stale hash before contacting anything.
    if let Some(h) = if_match {
        if h != from_tree.hash {
            if cx.json {
                print_json(
                    &serde_json::json!({"status": "refused", "reason": "stale --if-match", "current": from_tree.hash, "if_match": h}),
                );
            } else {
                eprintln!("error: refused: stale --if-match: the current tree is {}, not {h}; review `policyctl diff` and retry with the current hash", from_tree.hash);
            }
            return FAIL;
        }
    }
    let changes = match from_tree.compile(&cx.opts) {
        Ok(old) => diff::diff(&old.policy, &new.policy),
        Err(_) => diff::diff(&Policy::deny_all(), &new.policy),
    };
    if !cx.json {
        println!("new tree {} ({} files)", tree.hash, tree.files.len());
        for c in &changes {
            println!("{c}");
        }
    }
    if dry_run {
        if cx.json {
            print_json(
                &serde_json::json!({"status": "dry-run", "tree_hash": tree.hash, "changes": changes}),
            );
        } else {
            println!("dry run: nothing applied");
        }
        return OK;
    }
    let Some(root) = tree.primary_root().map(Path::to_path_buf) else {
        return FAIL;
    };
    let req = Request::Apply {
        tree_hash: tree.hash.clone(),
        root,
        if_match: if_match.map(String::from),
        revoke_live,
    };
    match hub_request(cx, &req) {
        Ok(Response::Applied(r)) => {
            if cx.json {
                print_json(&r);
            } else {
                println!("applied: generation {} ({})", r.generation, r.tree_hash);
                for l in &r.no_longer_allowed {
                    println!(
                        "  no longer allowed: {} {} {}{}",
                        l.kind,
                        l.vm,
                        l.description,
                        if r.revoked { " (revoked)" } else { "" }
                    );
                }
                if !r.no_longer_allowed.is_empty() && !r.revoked {
                    println!("  these stay until closed; --revoke-live tears them down");
                }
            }
            OK
        }
        Ok(other) => hub_unexpected(cx, other),
        Err(c) => c,
    }
}

fn hub_request(cx: &Ctx, req: &Request) -> Result<Response, u8> {
    let r = HubClient::connect(&cx.hub).and_then(|c| c.request(req));
    r.map_err(|e| {
        if cx.json {
            print_json(&serde_json::json!({"status": "error", "message": e.to_string()}));
        } else {
            eprintln!("error: {e}");
        }
        FAIL
    })
}

fn hub_unexpected(cx: &Ctx, r: Response) -> u8 {
    let msg = match r {
        Response::Error { message } => message,
        other => format!("unexpected answer from the hub: {other:?}"),
    };
    if cx.json {
        print_json(&serde_json::json!({"status": "error", "message": msg}));
    } else {
        eprintln!("error: hub: {msg}");
    }
    FAIL
}

fn status(cx: &Ctx) -> u8 {
    match hub_request(cx, &Request::Status) {
        Ok(Response::Status(s)) => {
            if cx.json {
                print_json(&s);
            } else {
                println!("generation {}\ntree {}", s.generation, s.tree_hash);
                for f in &s.files {
                    println!("  {f}");
                }
                match &s.last_rejected {
                    Some(r) => println!(
                        "last rejected apply: {} at {}: {}",
                        r.tree_hash, r.at_unix, r.reason
                    ),
                    None => println!("no rejected apply"),
                }
            }
            OK
        }
        Ok(other) => hub_unexpected(cx, other),
        Err(c) => c,
    }
}

fn log_cmd(cx: &Ctx, denied: bool, vm: Option<String>, follow: bool, since: u64) -> u8 {
    let mut filter = LogFilter {
        denied_only: denied,
        vm,
        since_seq: since,
        max: 1000,
    };
    loop {
        match hub_request(cx, &Request::Log(filter.clone())) {
            Ok(Response::Log(b)) => {
                for r in &b.records {
                    if cx.json {
                        match serde_json::to_string(r) {
                            Ok(s) => println!("{s}"),
                            Err(e) => eprintln!("error: {e}"),
                        }
                    } else {
                        let similar = if r.similar > 0 {
                            format!(" (+{} similar)", r.similar)
                        } else {
                            String::new()
                        };
                        println!(
                            "#{} gen {} {} {} {} {} {}{}{similar}",
                            r.seq,
                            r.generation,
                            if r.allowed { "ALLOW" } else { "DENY" },
                            r.src,
                            r.verb,
                            r.obj,
                            r.fds.join(","),
                            r.reason
                                .as_ref()
                                .map(|x| format!(" — {x}"))
                                .unwrap_or_default()
                        );
                    }
                }
                filter.since_seq = b.next_seq;
                if !follow {
                    return OK;
                }
                if b.records.is_empty() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            Ok(other) => return hub_unexpected(cx, other),
            Err(c) => return c,
        }
    }
}

fn fmt_cmd(cx: &Ctx, check: bool) -> u8 {
    let roots = cx.roots(None);
    let tree = PolicyTree::load(&roots);
    let mut code = OK;
    let mut changed = Vec::new();
    for f in &tree.files {
        if f.root != Some(0) {
            continue;
        }
        match pfmt::format_file(&f.display, &f.bytes) {
            Err(d) => {
                print_diags(cx, &d);
                code = FAIL;
            }
            Ok(out) if out.as_bytes() != f.bytes.as_slice() => {
                changed.push(f.display.clone());
                if check {
                    code = FAIL;
                } else if let Some(root) = roots.first() {
                    if let Err(e) = edit::atomic_write(&root.path.join(&f.rel), out.as_bytes()) {
                        eprintln!("error: {e}");
                        code = FAIL;
                    }
                }
            }
            Ok(_) => {}
        }
    }
    if cx.json {
        print_json(&serde_json::json!({"check": check, "changed": changed}));
    } else {
        for c in &changed {
            println!(
                "{} {c}",
                if check {
                    "would reformat"
                } else {
                    "reformatted"
                }
            );
        }
    }
    code
}

fn graph(cx: &Ctx, only: Option<&str>) -> u8 {
    let p = match load_current(cx, None) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut edges = BTreeSet::new();
    for (service, prov) in p.services() {
        if only.is_some_and(|o| o != service) {
            continue;
        }
        for vm in p
            .known_vms()
            .iter()
            .map(String::as_str)
            .chain([diff::ANY_VM])
        {
            if p.check_connect(vm, service, None).is_allowed() {
                edges.insert((vm.to_string(), prov.vm.clone(), service.to_string()));
            }
        }
    }
    if cx.json {
        print_json(
            &edges
                .iter()
                .map(|(a, b, s)| serde_json::json!({"from": a, "to": b, "service": s}))
                .collect::<Vec<_>>(),
        );
    } else {
        println!("digraph policy {{");
        for (a, b, s) in &edges {
            println!("  {a:?} -> {b:?} [label={s:?}];");
        }
        println!("}}");
    }
    OK
}

fn bench_cmd(cx: &Ctx, sizes: &[usize], iterations: usize) -> u8 {
    if cfg!(debug_assertions) {
        eprintln!("note: debug build; use `cargo run --release -p bulkhead-policy --bin policyctl -- bench` for real numbers");
    }
    let rows = bench::run(sizes, iterations);
    if cx.json {
        print_json(&rows);
    } else {
        println!(
            "{:>8} {:>11} {:>11} {:>13} {:>12} {:>12} {:>14} {:>13} {:>13} {:>6}",
            "rules",
            "compile_ms",
            "connect_ns",
            "connects/s",
            "connect_wall",
            "transfer_ns",
            "transfers/s",
            "scan_ns",
            "scan/indexed",
            "allow"
        );
        for r in &rows {
            println!(
                "{:>8} {:>11.1} {:>11.1} {:>13.0} {:>12.1} {:>12.1} {:>14.0} {:>13.1} {:>12.1}x {:>5.0}%",
                r.rules,
                r.compile_ms,
                r.connect_ns,
                1e9 / r.connect_ns,
                r.connect_wall_ns,
                r.transfer_ns,
                1e9 / r.transfer_ns,
                r.scan_ns,
                r.scan_ns / r.connect_ns,
                r.allow_ratio * 100.0
            );
        }
        println!("(ns = thread CPU time per check; connect_wall = wall clock, inflated on a busy machine; scan = linear-scan peer)");
    }
    let mut line = String::from("BENCH policy");
    for r in &rows {
        line.push_str(&format!(" ns_per_check_{}={:.1}", r.rules, r.connect_ns));
    }
    for r in &rows {
        line.push_str(&format!(" transfer_ns_{}={:.1}", r.rules, r.transfer_ns));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        line.push_str(&format!(
            " flat_ratio={:.2} scan_ratio_{}={:.1}",
            last.connect_ns / first.connect_ns,
            last.rules,
            last.scan_ns / last.connect_ns
        ));
    }
    println!("{line}");
    OK
}

fn prompt(question: &str) -> String {
    use std::io::Write;
    print!("{question} ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    match std::io::stdin().read_line(&mut answer) {
        Ok(0) | Err(_) => String::new(),
        Ok(_) => answer.trim().to_lowercase(),
    }
}

fn edit_cmd(cx: &Ctx, file: &str) -> u8 {
    if !bulkhead_policy::tree::valid_file_name(file)
        || !file.ends_with(bulkhead_policy::tree::SUFFIX)
    {
        eprintln!("error: bad policy file name `{file}` (use e.g. 50-local.policy)");
        return USAGE;
    }
    let roots = cx.roots(None);
    let Some(root) = roots.first() else {
        return USAGE;
    };
    let target = root.path.join(file);
    let original = std::fs::read(&target).unwrap_or_default();
    let old = match cx.load(&roots) {
        Ok((_, c)) => c.policy,
        Err(code) => return code,
    };
    let scratch = match tempfile_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot create a scratch directory: {e}");
            return FAIL;
        }
    };
    let copy = scratch.join(file);
    if let Err(e) = std::fs::write(&copy, &original) {
        eprintln!("error: cannot write {}: {e}", copy.display());
        return FAIL;
    }
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let code = loop {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&copy)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: editor `{editor}` failed; nothing written");
            break FAIL;
        }
        let edited = std::fs::read(&copy).unwrap_or_default();
        if edited == original {
            println!("no changes");
            break OK;
        }
        let mut ov = HashMap::new();
        ov.insert(target.clone(), edited.clone());
        match cx.load_overrides(&roots, &ov, true) {
            Err(_) => match prompt("invalid: (e)dit again / (d)iscard?").as_str() {
                "e" => continue,
                _ => {
                    println!("discarded; nothing written");
                    break FAIL;
                }
            },
            Ok((_, new)) => {
                print_diags(cx, &new.warnings);
                for c in diff::diff(&old, &new.policy) {
                    println!("{c}");
                }
                match prompt("(e)dit again / (d)iscard / (w)rite / (a)pply?").as_str() {
                    "e" => continue,
                    w @ ("w" | "a") => {
                        if let Err(e) = edit::atomic_write(&target, &edited) {
                            eprintln!("error: {e}");
                            break FAIL;
                        }
                        println!("wrote {}", target.display());
                        if w == "a" {
                            break apply(cx, false, None, false, None);
                        }
                        break OK;
                    }
                    _ => {
                        println!("discarded; nothing written");
                        break OK;
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    code
}

/// A private scratch directory for `edit` (mode 0700).
fn tempfile_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("policyctl-edit-{}-{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free scratch directory name"))
}
