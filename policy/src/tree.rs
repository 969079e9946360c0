//! Loading a policy tree: file-name rules, includes inside the tree only, limits, tree hash.
//!
//! A tree is one or more root directories: the persistent `/etc/bulkhead/policy.d` and the
//! transient `/run/bulkhead/policy.d` (when present), or one `--root DIR` for staging. Files
//! load in byte order of their names; semantics do not depend on the order.

use crate::ast::{Item, ParsedFile};
use crate::diag::{Diagnostic, Diagnostics};
use crate::parse::parse_bytes;
use crate::validate::{compile, Compiled, ValidateOptions};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The persistent policy directory.
pub const DEFAULT_ROOT: &str = "/etc/bulkhead/policy.d";
/// The transient policy directory (gone at reboot).
pub const TRANSIENT_ROOT: &str = "/run/bulkhead/policy.d";
/// Most files in a tree (including included files).
pub const MAX_FILES: usize = 1024;
/// Deepest include chain.
pub const MAX_INCLUDE_DEPTH: usize = 16;
/// The suffix of policy files.
pub const SUFFIX: &str = ".policy";

/// One directory of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootDir {
    /// The directory.
    pub path: PathBuf,
    /// Prefix of the file names from this root in provenance and the hash (`""` or `run/`).
    pub prefix: String,
    /// True if a missing directory is an error (a `--root`); false if it means "empty".
    pub required: bool,
}

impl RootDir {
    /// The default roots: `/etc/bulkhead/policy.d` plus `/run/bulkhead/policy.d`.
    pub fn defaults() -> Vec<RootDir> {
        vec![
            RootDir {
                path: PathBuf::from(DEFAULT_ROOT),
                prefix: String::new(),
                required: false,
            },
            RootDir {
                path: PathBuf::from(TRANSIENT_ROOT),
                prefix: "run/".into(),
                required: false,
            },
        ]
    }

    /// A single staging root (`--root DIR`), which replaces both defaults.
    pub fn staging(path: &Path) -> Vec<RootDir> {
        vec![RootDir {
            path: path.to_path_buf(),
            prefix: String::new(),
            required: true,
        }]
    }
}

/// One loaded file.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// Name in provenance and in the hash (`10-base.policy`, `run/20-dispvm.policy`).
    pub name: String,
    /// The path shown in diagnostics.
    pub display: String,
    /// Index of the root it came from (None for in-memory sources).
    pub root: Option<usize>,
    /// The file's path relative to its root.
    pub rel: String,
    /// The raw contents.
    pub bytes: Vec<u8>,
}

/// A loaded (not yet validated) policy tree.
#[derive(Clone, Debug)]
pub struct PolicyTree {
    /// The roots it was loaded from (empty for in-memory trees).
    pub roots: Vec<RootDir>,
    /// Every file that was read, sorted by name.
    pub files: Vec<SourceFile>,
    /// The parsed files (same order as `files`).
    pub parsed: Vec<ParsedFile>,
    /// Load and parse errors.
    pub diagnostics: Vec<Diagnostic>,
    /// `sha256:<hex>` over the sorted file names and contents.
    pub hash: String,
}

/// Check a file or directory name: `[0-9a-z][0-9a-z_.-]*`.
pub fn valid_file_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
}

/// Check an include path: relative, no `.`/`..`, every component a valid name, ends in
/// `.policy`.
pub fn check_include_path(rel: &str) -> Result<(), String> {
    if rel.starts_with('/') {
        return Err("include paths are relative to the policy directory".into());
    }
    for comp in rel.split('/') {
        if comp == ".." || comp == "." {
            return Err(
                "include paths may not contain `.` or `..`: includes stay inside the policy tree"
                    .into(),
            );
        }
        if !valid_file_name(comp) {
            return Err(format!(
                "`{}` is not a valid file name ([0-9a-z][0-9a-z_.-]*)",
                comp.escape_debug()
            ));
        }
    }
    if !rel.ends_with(SUFFIX) {
        return Err("included files must end in .policy".into());
    }
    Ok(())
}

fn tree_hash(files: &[SourceFile]) -> String {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.name.as_bytes());
        h.update([0u8]);
        h.update((f.bytes.len() as u64).to_le_bytes());
        h.update(&f.bytes);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Reads files for the include walk: `(root index, relative path)` → bytes.
type Reader<'a> = dyn FnMut(Option<usize>, &str) -> Result<Vec<u8>, String> + 'a;

struct Walk<'a> {
    read: &'a mut Reader<'a>,
    roots: &'a [RootDir],
    state: HashMap<(Option<usize>, String), bool>,
    files: Vec<SourceFile>,
    parsed: Vec<ParsedFile>,
    diags: Vec<Diagnostic>,
}

impl Walk<'_> {
    fn display(&self, root: Option<usize>, rel: &str) -> String {
        match root.and_then(|r| self.roots.get(r)) {
            Some(r) => r.path.join(rel).display().to_string(),
            None => rel.to_string(),
        }
    }

    fn name(&self, root: Option<usize>, rel: &str) -> String {
        match root.and_then(|r| self.roots.get(r)) {
            Some(r) => format!("{}{rel}", r.prefix),
            None => rel.to_string(),
        }
    }

    /// Visit a file and (depth-first) its includes. `chain` is the include stack.
    fn visit(&mut self, root: Option<usize>, rel: &str, chain: &mut Vec<String>) {
        let key = (root, rel.to_string());
        if self.state.contains_key(&key) {
            return;
        }
        if self.files.len() >= MAX_FILES {
            let d = self.display(root, rel);
            self.diags.push(
                Diagnostic::error(&d, 0, 0, format!("more than {MAX_FILES} policy files"))
                    .with_help("merge small files"),
            );
            return;
        }
        self.state.insert(key.clone(), false);
        let display = self.display(root, rel);
        let bytes = match (self.read)(root, rel) {
            Ok(b) => b,
            Err(e) => {
                self.diags.push(Diagnostic::error(&display, 0, 0, e));
                self.state.insert(key, true);
                return;
            }
        };
        let name = self.name(root, rel);
        if bytes.is_empty() {
            self.diags.push(
                Diagnostic::warning(&display, 0, 0, "empty policy file (a truncated write?)")
                    .with_help("an empty file grants nothing; delete it or add `version 1`"),
            );
        }
        let (parsed, mut d) = parse_bytes(&name, &display, &bytes);
        self.diags.append(&mut d);
        let includes: Vec<(u32, String)> = parsed
            .lines
            .iter()
            .filter_map(|l| match &l.item {
                Item::Include(p) => Some((l.line, p.clone())),
                _ => None,
            })
            .collect();
        self.files.push(SourceFile {
            name,
            display: display.clone(),
            root,
            rel: rel.to_string(),
            bytes,
        });
        self.parsed.push(parsed);
        chain.push(rel.to_string());
        for (line, inc) in includes {
            if let Err(e) = check_include_path(&inc) {
                self.diags.push(Diagnostic::error(&display, line, 9, e).with_help("write a path relative to the policy directory, e.g. `include vendor/base.policy`"));
                continue;
            }
            if chain.len() >= MAX_INCLUDE_DEPTH {
                self.diags.push(
                    Diagnostic::error(
                        &display,
                        line,
                        9,
                        format!("includes nested deeper than {MAX_INCLUDE_DEPTH}"),
                    )
                    .with_help("flatten the includes"),
                );
                continue;
            }
            match self.state.get(&(root, inc.clone())) {
                Some(false) => {
                    let mut cyc = chain.clone();
                    cyc.push(inc.clone());
                    self.diags.push(Diagnostic::error(&display, line, 9, format!("include cycle: {}", cyc.join(" → "))).with_help("remove one of the includes; every file in the directory is loaded anyway"));
                }
                Some(true) => {}
                None => self.visit(root, &inc, chain),
            }
        }
        chain.pop();
        self.state.insert(key, true);
    }
}

/// Read a file inside `root`, refusing symlinks that leave the tree and oversized files.
fn read_inside(root: &Path, rel: &str) -> Result<Vec<u8>, String> {
    let path = root.join(rel);
    let croot = root
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", root.display()))?;
    let cpath = path
        .canonicalize()
        .map_err(|e| format!("cannot open: {e}"))?;
    if !cpath.starts_with(&croot) {
        return Err(format!(
            "resolves to {} outside the policy tree (symlink?)",
            cpath.display()
        ));
    }
    let meta = std::fs::metadata(&cpath).map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let f = std::fs::File::open(&cpath).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    let limit = u64::try_from(crate::lex::MAX_FILE_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    f.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

impl PolicyTree {
    /// Load a tree from directories. Never fails: problems are in `diagnostics`.
    pub fn load(roots: &[RootDir]) -> PolicyTree {
        Self::load_with_overrides(roots, &HashMap::new())
    }

    /// Load a tree as it would be if the files in `overrides` (full path under a root →
    /// contents) had those contents. Edits validate the result this way before writing, and
    /// `validate FILE…` checks files against the tree.
    pub fn load_with_overrides(
        roots: &[RootDir],
        overrides: &HashMap<PathBuf, Vec<u8>>,
    ) -> PolicyTree {
        let mut diags = Vec::new();
        let mut top: Vec<(usize, String)> = Vec::new();
        for (i, root) in roots.iter().enumerate() {
            let rd = match std::fs::read_dir(&root.path) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !root.required => continue,
                Err(e) => {
                    diags.push(
                        Diagnostic::error(
                            &root.path.display().to_string(),
                            0,
                            0,
                            format!("cannot read policy directory: {e}"),
                        )
                        .with_help("create it or pass an existing --root DIR"),
                    );
                    continue;
                }
            };
            let mut names = Vec::new();
            for entry in rd {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        diags.push(Diagnostic::error(
                            &root.path.display().to_string(),
                            0,
                            0,
                            format!("cannot list: {e}"),
                        ));
                        continue;
                    }
                };
                let raw = entry.file_name();
                let bytes = raw.as_encoded_bytes();
                if bytes.starts_with(b".") || !bytes.ends_with(SUFFIX.as_bytes()) {
                    // Dotfiles, editor backups (x.policy~, .x.swp), other suffixes.
                    log::debug!("ignoring {}", root.path.join(&raw).display());
                    continue;
                }
                let display = root.path.join(&raw).display().to_string();
                match raw.to_str() {
                    Some(n) if valid_file_name(n) => names.push(n.to_string()),
                    _ => diags.push(Diagnostic::error(&display, 0, 0, "invalid policy file name").with_help("names match [0-9a-z][0-9a-z_.-]*.policy (lowercase ASCII), e.g. 50-local.policy")),
                }
            }
            for p in overrides.keys() {
                if p.parent() == Some(root.path.as_path()) {
                    if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                        if !names.iter().any(|x| x == n) {
                            if valid_file_name(n) && n.ends_with(SUFFIX) {
                                names.push(n.to_string());
                            } else {
                                diags.push(Diagnostic::error(&p.display().to_string(), 0, 0, "invalid policy file name").with_help("names match [0-9a-z][0-9a-z_.-]*.policy (lowercase ASCII), e.g. 50-local.policy"));
                            }
                        }
                    }
                }
            }
            names.sort();
            top.extend(names.into_iter().map(|n| (i, n)));
        }
        let mut reader = |root: Option<usize>, rel: &str| -> Result<Vec<u8>, String> {
            let r = root
                .and_then(|r| roots.get(r))
                .ok_or_else(|| "no root".to_string())?;
            if let Some(b) = overrides.get(&r.path.join(rel)) {
                return Ok(b.clone());
            }
            read_inside(&r.path, rel)
        };
        let mut tree = Self::walk(
            roots,
            top.into_iter().map(|(r, n)| (Some(r), n)).collect(),
            &mut reader,
        );
        diags.append(&mut tree.diagnostics);
        tree.diagnostics = diags;
        tree
    }

    /// Build a tree from in-memory files `(name, contents)`; includes resolve among them.
    pub fn from_sources(sources: &[(String, Vec<u8>)]) -> PolicyTree {
        let map: HashMap<&str, &Vec<u8>> = sources.iter().map(|(n, b)| (n.as_str(), b)).collect();
        let mut names: Vec<String> = sources
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !n.contains('/'))
            .collect();
        names.sort();
        let mut reader = |_: Option<usize>, rel: &str| -> Result<Vec<u8>, String> {
            map.get(rel)
                .map(|b| (*b).clone())
                .ok_or_else(|| "no such file in the tree".to_string())
        };
        Self::walk(
            &[],
            names.into_iter().map(|n| (None, n)).collect(),
            &mut reader,
        )
    }

    /// Rebuild a loaded tree from every one of its files `(name, contents)`, included files
    /// too, as a hub exports its running generation ([`crate::control::RunningTree`]). Each
    /// file is parsed as it is, without following includes (their targets are in the
    /// list), so the hash is the loaded tree's.
    pub fn from_files(files: &[(String, Vec<u8>)]) -> PolicyTree {
        let mut sorted: Vec<&(String, Vec<u8>)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        let mut diags = Vec::new();
        let mut out = Vec::with_capacity(sorted.len());
        let mut parsed = Vec::with_capacity(sorted.len());
        for (name, bytes) in sorted {
            let (p, mut d) = parse_bytes(name, name, bytes);
            diags.append(&mut d);
            parsed.push(p);
            out.push(SourceFile {
                name: name.clone(),
                display: name.clone(),
                root: None,
                rel: name.clone(),
                bytes: bytes.clone(),
            });
        }
        let hash = tree_hash(&out);
        PolicyTree {
            roots: Vec::new(),
            files: out,
            parsed,
            diagnostics: diags,
            hash,
        }
    }

    fn walk<'a>(
        roots: &'a [RootDir],
        top: Vec<(Option<usize>, String)>,
        read: &'a mut Reader<'a>,
    ) -> PolicyTree {
        let mut w = Walk {
            read,
            roots,
            state: HashMap::new(),
            files: Vec::new(),
            parsed: Vec::new(),
            diags: Vec::new(),
        };
        for (root, rel) in top {
            let mut chain = Vec::new();
            w.visit(root, &rel, &mut chain);
        }
        let mut pairs: Vec<(SourceFile, ParsedFile)> = w.files.into_iter().zip(w.parsed).collect();
        pairs.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let (files, parsed): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let hash = tree_hash(&files);
        PolicyTree {
            roots: roots.to_vec(),
            files,
            parsed,
            diagnostics: w.diags,
            hash,
        }
    }

    /// Validate the tree into an immutable [`crate::Policy`] (plus warnings), or return every
    /// error. With `opts.strict`, warnings are errors.
    pub fn compile(&self, opts: &ValidateOptions) -> Result<Compiled, Diagnostics> {
        let errors: Vec<Diagnostic> = self
            .diagnostics
            .iter()
            .filter(|d| d.is_error())
            .cloned()
            .collect();
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        let displays: HashMap<String, String> = self
            .files
            .iter()
            .map(|f| (f.name.clone(), f.display.clone()))
            .collect();
        let mut c = compile(&self.parsed, &displays, &self.hash, opts)?;
        let mut own: Vec<Diagnostic> = self.diagnostics.clone();
        if opts.strict && !own.is_empty() {
            for d in &mut own {
                d.severity = crate::diag::Severity::Error;
            }
            return Err(Diagnostics(own));
        }
        c.warnings.extend(own);
        c.warnings.sort();
        Ok(c)
    }

    /// The primary (first) root directory, where edits go.
    pub fn primary_root(&self) -> Option<&Path> {
        self.roots.first().map(|r| r.path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(files: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        files
            .iter()
            .map(|(n, b)| (n.to_string(), b.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn include_cycle_is_an_error_with_location() {
        let t = PolicyTree::from_sources(&src(&[
            ("a.policy", "include sub/b.policy\n"),
            ("sub/b.policy", "version 1\ninclude a.policy\n"),
        ]));
        let d = t
            .diagnostics
            .iter()
            .find(|d| d.message.contains("cycle"))
            .expect("cycle reported");
        assert_eq!((d.path.as_str(), d.line, d.col), ("sub/b.policy", 2, 9));
        assert!(t.compile(&ValidateOptions::default()).is_err());
    }

    #[test]
    fn include_dotdot_and_absolute_rejected() {
        for inc in [
            "../etc/passwd.policy",
            "/etc/x.policy",
            "a/./b.policy",
            "x.conf",
            "Up.policy",
        ] {
            let t = PolicyTree::from_sources(&src(&[("a.policy", &format!("include {inc}\n"))]));
            assert!(
                t.diagnostics.iter().any(|d| d.is_error() && d.line == 1),
                "{inc}"
            );
        }
    }

    #[test]
    fn hash_depends_on_names_and_contents_only() {
        let a = PolicyTree::from_sources(&src(&[("a.policy", "version 1\n"), ("b.policy", "")]));
        let b = PolicyTree::from_sources(&src(&[("b.policy", ""), ("a.policy", "version 1\n")]));
        let c = PolicyTree::from_sources(&src(&[("a.policy", "version 1\n"), ("c.policy", "")]));
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
        assert!(a.hash.starts_with("sha256:"));
    }

    /// A tree loaded from two roots (the transient one's names carry `run/`) with an
    /// included file comes back from its exported files with the same hash and policy.
    #[test]
    fn a_loaded_tree_rebuilt_from_its_files_has_the_same_hash_and_rules() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        let run = d.path().join("run");
        std::fs::create_dir_all(etc.join("vendor")).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            etc.join("10-base.policy"),
            "version 1\ninclude vendor/apps.policy\ngrant gpu-vm provide wayland c2s=memfd:ro\n",
        )
        .unwrap();
        std::fs::write(etc.join("vendor/apps.policy"), "group apps browser mail\n").unwrap();
        std::fs::write(
            run.join("20-dispvm.policy"),
            "grant @apps connect wayland\n",
        )
        .unwrap();
        let roots = vec![
            RootDir {
                path: etc,
                prefix: String::new(),
                required: true,
            },
            RootDir {
                path: run,
                prefix: "run/".into(),
                required: false,
            },
        ];
        let loaded = PolicyTree::load(&roots);
        assert_eq!(loaded.files.len(), 3);
        let files: Vec<(String, Vec<u8>)> = loaded
            .files
            .iter()
            .map(|f| (f.name.clone(), f.bytes.clone()))
            .collect();
        let rebuilt = PolicyTree::from_files(&files);
        assert_eq!(rebuilt.hash, loaded.hash);
        let opts = ValidateOptions::default();
        let (a, b) = (
            loaded.compile(&opts).unwrap(),
            rebuilt.compile(&opts).unwrap(),
        );
        assert_eq!(a.policy.rules().len(), b.policy.rules().len());
        assert!(b.policy.check_connect("mail", "wayland", None).is_allowed());
        assert_eq!(crate::diff::diff(&a.policy, &b.policy), Vec::new());
    }

    #[test]
    fn file_names() {
        assert!(valid_file_name("10-base.policy"));
        assert!(!valid_file_name("Base.policy"));
        assert!(!valid_file_name("ünï.policy"));
        assert!(!valid_file_name(".x.policy"));
    }
}
