//! Atomic, idempotent edits of a policy tree (`grant`, `deny`, `revoke`, `fmt`).
//!
//! Every edit computes the new file contents, validates the whole tree as it would be, and
//! only then writes: temp file in the same directory, fsync, rename over the old file, fsync
//! the directory. A rejected edit writes nothing.

use crate::ast::{Action, Effect, Item, Rule, Subject};
use crate::diag::Diagnostics;
use crate::diff::{diff, Change};
use crate::eval::{Policy, RuleRef};
use crate::tree::{valid_file_name, PolicyTree, RootDir, SUFFIX};
use crate::validate::{overlap, ValidateOptions};
use crate::Diagnostic;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why an edit was not made.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The tree is already invalid; fix it first.
    #[error("the current policy tree is invalid; fix it first:\n{0}")]
    TreeInvalid(Diagnostics),
    /// The edit would make the tree invalid; nothing was written.
    #[error("the edit would make the policy invalid; nothing was written:\n{0}")]
    WouldBeInvalid(Diagnostics),
    /// Bad target file name.
    #[error("bad policy file name `{0}` (use [0-9a-z][0-9a-z_.-]*.policy, e.g. 50-local.policy)")]
    BadFileName(String),
    /// No root to edit.
    #[error("no policy directory to edit")]
    NoRoot,
    /// Writing failed.
    #[error("cannot write {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let io = |err| EditError::Io {
        path: path.to_path_buf(),
        err,
    };
    let dir = path
        .parent()
        .ok_or_else(|| io(std::io::Error::other("no parent directory")))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("policy");
    // A dotfile: the loader ignores it even if we crash before the rename.
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        log::info!("wrote {} ({} bytes)", path.display(), bytes.len());
    }
    res.map_err(io)
}

/// A successful edit.
#[derive(Debug)]
pub struct Edited {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// The semantic diff.
    pub changes: Vec<Change>,
    /// Warnings of the new tree.
    pub warnings: Vec<Diagnostic>,
}

/// Result of [`add_rule`].
#[derive(Debug)]
pub enum AddOutcome {
    /// The same rule already exists; nothing written.
    AlreadyPresent(RuleRef),
    /// The rule was appended.
    Added(Edited),
}

fn current(roots: &[RootDir], opts: &ValidateOptions) -> Result<(PolicyTree, Policy), EditError> {
    let tree = PolicyTree::load(roots);
    let p = tree.compile(opts).map_err(EditError::TreeInvalid)?;
    Ok((tree, p.policy))
}

fn write_all(
    roots: &[RootDir],
    old: &Policy,
    overrides: HashMap<PathBuf, Vec<u8>>,
    opts: &ValidateOptions,
) -> Result<Edited, EditError> {
    let tree = PolicyTree::load_with_overrides(roots, &overrides);
    let new = tree.compile(opts).map_err(EditError::WouldBeInvalid)?;
    let mut files: Vec<PathBuf> = overrides.keys().cloned().collect();
    files.sort();
    for f in &files {
        if let Some(b) = overrides.get(f) {
            atomic_write(f, b)?;
        }
    }
    Ok(Edited {
        files,
        changes: diff(old, &new.policy),
        warnings: new.warnings,
    })
}

/// Append `rule` (canonical text) to `file_name` in the primary root, unless the same rule
/// already exists anywhere in the tree.
pub fn add_rule(
    roots: &[RootDir],
    file_name: &str,
    rule: &Rule,
    opts: &ValidateOptions,
) -> Result<AddOutcome, EditError> {
    if !valid_file_name(file_name) || !file_name.ends_with(SUFFIX) {
        return Err(EditError::BadFileName(file_name.to_string()));
    }
    let root = roots.first().ok_or(EditError::NoRoot)?;
    if !root.required {
        std::fs::create_dir_all(&root.path).map_err(|err| EditError::Io {
            path: root.path.clone(),
            err,
        })?;
    }
    let (_, old) = current(roots, opts)?;
    let text = rule.to_string();
    if let Some(e) = old.rules().iter().find(|e| e.rule.to_string() == text) {
        return Ok(AddOutcome::AlreadyPresent(e.at.clone()));
    }
    let target = root.path.join(file_name);
    let mut bytes = match std::fs::read(&target) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(EditError::Io { path: target, err }),
    };
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    let mut overrides = HashMap::new();
    overrides.insert(target, bytes);
    write_all(roots, &old, overrides, opts).map(AddOutcome::Added)
}

/// What `revoke` matches: effect, subject, verb and object (a connect object without
/// `@provider` matches any provider).
#[derive(Clone, Debug)]
pub struct RuleKey {
    /// Grant or deny lines.
    pub effect: Effect,
    /// Subject.
    pub subject: Subject,
    /// The action (only verb and object are compared).
    pub action: Action,
}

fn same_object(a: &Action, b: &Action) -> bool {
    match (a, b) {
        (
            Action::Connect {
                service: s1,
                provider: p1,
                ..
            },
            Action::Connect {
                service: s2,
                provider: p2,
                ..
            },
        ) => s1 == s2 && (p1.is_none() || p2.is_none() || p1 == p2),
        _ => a.verb() == b.verb() && a.object() == b.object(),
    }
}

/// Result of [`remove_rule`].
#[derive(Debug)]
pub struct Revoked {
    /// Lines removed.
    pub removed: Vec<RuleRef>,
    /// The edit (None if nothing was removed).
    pub edited: Option<Edited>,
    /// Grants that still give the subject this access (from a group, `@any`, another
    /// root), with their location.
    pub still_granted: Vec<String>,
}

/// Remove the lines matching `key` from the primary root's files; then report any other
/// grant that still gives the subject the same access.
pub fn remove_rule(
    roots: &[RootDir],
    key: &RuleKey,
    opts: &ValidateOptions,
) -> Result<Revoked, EditError> {
    let (tree, old) = current(roots, opts)?;
    let mut removed = Vec::new();
    let mut overrides = HashMap::new();
    for (f, parsed) in tree.files.iter().zip(&tree.parsed) {
        if f.root != Some(0) {
            continue;
        }
        let hits: Vec<u32> = parsed
            .lines
            .iter()
            .filter(|l| match &l.item {
                Item::Rule(r) => {
                    r.effect == key.effect
                        && r.subject == key.subject
                        && same_object(&r.action, &key.action)
                }
                _ => false,
            })
            .map(|l| l.line)
            .collect();
        if hits.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(&f.bytes);
        let mut out = String::with_capacity(text.len());
        let lines: Vec<&str> = text.split('\n').collect();
        let last = lines.len();
        for (i, l) in lines.into_iter().enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            if hits.contains(&n) {
                continue;
            }
            out.push_str(l);
            if i + 1 < last {
                out.push('\n');
            }
        }
        let root = roots.first().ok_or(EditError::NoRoot)?;
        overrides.insert(root.path.join(&f.rel), out.into_bytes());
        removed.extend(hits.into_iter().map(|line| RuleRef {
            file: std::sync::Arc::from(f.name.as_str()),
            line,
        }));
    }
    let (edited, new) = if overrides.is_empty() {
        (None, old)
    } else {
        let e = write_all(roots, &old, overrides, opts)?;
        let (_, new) = current(roots, opts)?;
        (Some(e), new)
    };
    let mut still = Vec::new();
    if key.effect == Effect::Grant {
        for e in new.rules() {
            if e.rule.effect == Effect::Grant
                && same_object(&e.rule.action, &key.action)
                && overlap(&e.rule.subject, &key.subject, new.groups())
            {
                let via = match &e.rule.subject {
                    s if *s == key.subject => "directly".to_string(),
                    s => format!("via {s}"),
                };
                still.push(format!(
                    "{} gets this {via} at {}: {}",
                    key.subject, e.at, e.rule
                ));
            }
        }
    }
    Ok(Revoked {
        removed,
        edited,
        still_granted: still,
    })
}
