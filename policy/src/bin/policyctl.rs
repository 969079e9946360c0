//! `policyctl`: edit, check and apply Bulkhead policy. See `policyctl --help` and
//! docs/policy.md.
//!
//! The binary only parses the command line and dispatches: each command lives in
//! `policy/src/cli/<command>.rs`.

use bulkhead_policy::ast::Effect;
use bulkhead_policy::cli::check::CheckArgs;
use bulkhead_policy::cli::grant::EditArgs;
use bulkhead_policy::cli::list::ListWhat;
use bulkhead_policy::cli::{self, Ctx};
use bulkhead_policy::control::HUB_SOCKET;
use bulkhead_policy::{sysfs, ValidateOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let cx = Ctx {
        json: cli.json,
        opts: ValidateOptions {
            strict: cli.strict,
            known_vms: cli.known_vms.map(|v| v.into_iter().collect()),
            phys_ram: cli::phys_ram(),
        },
        sysfs: cli.sysfs_root,
        force: cli.force,
        hub: cli.hub_socket,
        root: cli.root,
    };
    let code = match cli.cmd {
        Cmd::Validate { files } => cli::validate::run(&cx, &files),
        Cmd::Grant(a) => cli::grant::run(&cx, Effect::Grant, &a),
        Cmd::Deny(a) => cli::grant::run(&cx, Effect::Deny, &a),
        Cmd::Revoke { words, deny } => cli::revoke::run(&cx, &words, deny),
        Cmd::Show { what } => cli::show::run(&cx, what.as_deref()),
        Cmd::List { what } => cli::list::run(&cx, what),
        Cmd::Check(a) | Cmd::Explain(a) => cli::check::run(&cx, &a),
        Cmd::Diff { from, to } => cli::diff::run(&cx, from.as_deref(), to.as_deref()),
        Cmd::Apply {
            dry_run,
            if_match,
            revoke_live,
            from,
        } => cli::apply::run(
            &cx,
            dry_run,
            if_match.as_deref(),
            revoke_live,
            from.as_deref(),
        ),
        Cmd::Edit { file } => cli::edit::run(&cx, &file),
        Cmd::Status => cli::status::run(&cx),
        Cmd::Log {
            denied,
            vm,
            follow,
            since,
        } => cli::log::run(&cx, denied, vm, follow, since),
        Cmd::Fmt { check } => cli::fmt::run(&cx, check),
        Cmd::Graph { service } => cli::graph::run(&cx, service.as_deref()),
        Cmd::Bench { sizes, iterations } => cli::bench::run(&cx, &sizes, iterations),
    };
    ExitCode::from(code)
}
