//! Kernel modules: their `.modinfo` ELF section, the dependency closure of the modules a
//! system asks for, and the `modules.dep` / `modules.softdep` files init reads at boot.
//!
//! Debian's kernel package ships no `modules.dep` (depmod runs at install time), so the
//! dependencies are read from each module's own `.modinfo` (`depends=a,b`,
//! `softdep=pre: x post: y`), through the file's compression if it has one (6.12's
//! `.ko.xz`); images carry modules decompressed, as `.ko`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

/// Errors reading modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a kernel module ELF file: {reason}")]
    BadElf { path: PathBuf, reason: String },
    #[error("{path}: no .modinfo section")]
    NoModinfo { path: PathBuf },
    #[error("module {name:?} is not in {dir} (needed by {needed_by})")]
    Missing {
        name: String,
        dir: PathBuf,
        needed_by: String,
    },
    #[error("{path}: {source}")]
    Decompress {
        path: PathBuf,
        source: crate::compressed::DecompressError,
    },
}

/// Module names treat `-` and `_` alike; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// What a module's `.modinfo` says about its name and dependencies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    /// The kernel release and options it was built for (a kernel loads only its own).
    pub vermagic: Option<String>,
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
    pub softdep_post: Vec<String>,
}

/// Parses the raw bytes of a `.modinfo` section: NUL-separated `key=value` strings.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|b| *b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize(value)),
            "vermagic" => info.vermagic = Some(value.to_string()),
            "depends" => info
                .depends
                .extend(value.split(',').filter(|d| !d.is_empty()).map(normalize)),
            "softdep" => {
                let mut list: Option<&mut Vec<String>> = None;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => list = Some(&mut info.softdep_pre),
                        "post:" => list = Some(&mut info.softdep_post),
                        w => {
                            if let Some(l) = list.as_deref_mut() {
                                l.push(normalize(w));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// A module file's contents (decompressed).
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    crate::compressed::read_module(path).map_err(|e| match e {
        crate::compressed::ReadError::Io(source) => ModuleError::Io {
            path: path.to_path_buf(),
            source,
        },
        crate::compressed::ReadError::Decompress(source) => ModuleError::Decompress {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Reads `.modinfo` from a module file (compressed or not).
pub fn read_modinfo(path: &Path) -> Result<ModInfo, ModuleError> {
    let data = read_module(path)?;
    let file = object::File::parse(&*data).map_err(|e| ModuleError::BadElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| ModuleError::NoModinfo {
            path: path.to_path_buf(),
        })?;
    let bytes = section.data().map_err(|e| ModuleError::BadElf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(parse_modinfo(bytes))
}

/// The modules of one kernel release: name → path relative to `lib/modules/<abi>/` (of the
/// file as it is, compressed or not).
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    by_name: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
    /// Out-of-tree modules: name → built `.ko` (they go to `extra/` in images).
    external: BTreeMap<String, PathBuf>,
}

/// One module chosen for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenModule {
    pub name: String,
    /// Where the module file is on the build machine (perhaps compressed: read it with
    /// [`read_module`]).
    pub source: PathBuf,
    /// Its path in images, relative to `lib/modules/<abi>/`: always a plain `.ko`.
    pub rel_path: String,
    /// Direct dependencies (normalised names).
    pub depends: Vec<String>,
    pub softdep_pre: Vec<String>,
    pub softdep_post: Vec<String>,
}

fn stem(file_name: &str) -> Option<&str> {
    file_name.strip_suffix(".ko")
}

/// The image path of a module file: its compression suffix dropped.
fn image_path(rel: &str) -> String {
    match rel.rsplit_once(".ko.") {
        Some((base, _)) => format!("{base}.ko"),
        None => rel.to_string(),
    }
}

impl ModuleIndex {
    /// Indexes `dir` (= `.../lib/modules/<abi>`): every `.ko` under it, and
    /// `modules.builtin` for modules compiled into the kernel.
    pub fn scan(dir: &Path) -> Result<Self, ModuleError> {
        let mut by_name = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(|source| ModuleError::Io {
                path: d.clone(),
                source,
            })?;
            for entry in rd {
                let entry = entry.map_err(|source| ModuleError::Io {
                    path: d.clone(),
                    source,
                })?;
                let path = entry.path();
                let ft = entry.file_type().map_err(|source| ModuleError::Io {
                    path: path.clone(),
                    source,
                })?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some((s, compression)) = crate::compressed::Compression::split(&name) else {
                    continue;
                };
                if let Ok(rel) = path.strip_prefix(dir) {
                    let rel = rel.to_string_lossy().into_owned();
                    // A plain `.ko` wins over a compressed one of the same name.
                    if compression.is_none() {
                        by_name.insert(normalize(s), rel);
                    } else {
                        by_name.entry(normalize(s)).or_insert(rel);
                    }
                }
            }
        }
        let mut builtin = BTreeSet::new();
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.builtin")) {
            for line in text.lines() {
                if let Some(file) = line.rsplit('/').next().and_then(stem) {
                    builtin.insert(normalize(file));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            by_name,
            builtin,
            external: BTreeMap::new(),
        })
    }

    /// Adds an out-of-tree module (built elsewhere); images carry it as `extra/<name>.ko`.
    pub fn add_external(&mut self, name: &str, ko: PathBuf) {
        let n = normalize(name);
        self.by_name.insert(n.clone(), format!("extra/{n}.ko"));
        self.external.insert(n, ko);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalize(name))
    }

    /// Path of a module relative to the index dir.
    pub fn rel_path(&self, name: &str) -> Option<&str> {
        self.by_name.get(&normalize(name)).map(String::as_str)
    }

    /// The requested modules and everything they need (`depends=` and softdeps), in an
    /// order in which they can be loaded one after the other. Built-in modules are left out.
    pub fn closure(&self, requested: &[String]) -> Result<Vec<ChosenModule>, ModuleError> {
        let mut chosen: BTreeMap<String, ChosenModule> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        // (name, who needs it, optional): softdeps are optional, as for modprobe (vfio
        // names the PowerPC-only vfio_iommu_spapr_tce, absent on x86).
        let mut work: Vec<(String, String, bool)> = requested
            .iter()
            .rev()
            .map(|r| (normalize(r), "the system configuration".to_string(), false))
            .collect();
        while let Some((name, needed_by, optional)) = work.pop() {
            if chosen.contains_key(&name) || self.is_builtin(&name) {
                continue;
            }
            let Some(rel) = self.rel_path(&name) else {
                if optional {
                    log::debug!("soft dependency {name} of {needed_by} is not in this kernel");
                    continue;
                }
                return Err(ModuleError::Missing {
                    name,
                    dir: self.dir.clone(),
                    needed_by,
                });
            };
            let rel = rel.to_string();
            let source = self
                .external
                .get(&name)
                .cloned()
                .unwrap_or_else(|| self.dir.join(&rel));
            let info = read_modinfo(&source)?;
            for dep in &info.depends {
                work.push((dep.clone(), name.clone(), false));
            }
            for dep in info.softdep_pre.iter().chain(&info.softdep_post) {
                work.push((dep.clone(), name.clone(), true));
            }
            order.push(name.clone());
            chosen.insert(
                name.clone(),
                ChosenModule {
                    name,
                    source,
                    rel_path: image_path(&rel),
                    depends: info.depends,
                    softdep_pre: info.softdep_pre,
                    softdep_post: info.softdep_post,
                },
            );
        }
        // Topological order: dependencies (and pre-softdeps) before dependents.
        let mut sorted = Vec::new();
        let mut state: BTreeMap<String, bool> = BTreeMap::new(); // false: visiting, true: done
        fn visit(
            n: &str,
            chosen: &BTreeMap<String, ChosenModule>,
            state: &mut BTreeMap<String, bool>,
            sorted: &mut Vec<ChosenModule>,
        ) {
            if state.contains_key(n) {
                return; // done, or a cycle (modules can't have hard cycles; be lenient)
            }
            state.insert(n.to_string(), false);
            if let Some(m) = chosen.get(n) {
                for d in m.depends.iter().chain(&m.softdep_pre) {
                    visit(d, chosen, state, sorted);
                }
                sorted.push(m.clone());
            }
            state.insert(n.to_string(), true);
        }
        for n in &order {
            visit(n, &chosen, &mut state, &mut sorted);
        }
        Ok(sorted)
    }
}

/// All transitive hard dependencies of `m`, dependents first (depmod's order: loading from
/// the end of the list works).
fn transitive_deps(m: &ChosenModule, all: &BTreeMap<&str, &ChosenModule>) -> Vec<String> {
    let mut load_order: Vec<String> = Vec::new();
    fn walk(
        name: &str,
        all: &BTreeMap<&str, &ChosenModule>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) {
        let Some(m) = all.get(name) else { return };
        for d in &m.depends {
            if seen.insert(d.clone()) {
                walk(d, all, seen, out);
                out.push(d.clone());
            }
        }
    }
    let mut seen = BTreeSet::new();
    walk(&m.name, all, &mut seen, &mut load_order);
    load_order.reverse();
    load_order
}

/// `modules.dep` in depmod's format for the chosen modules.
pub fn modules_dep(chosen: &[ChosenModule]) -> String {
    let all: BTreeMap<&str, &ChosenModule> = chosen.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut out = String::new();
    for m in chosen {
        out.push_str(&m.rel_path);
        out.push(':');
        for d in transitive_deps(m, &all) {
            if let Some(dm) = all.get(d.as_str()) {
                out.push(' ');
                out.push_str(&dm.rel_path);
            }
        }
        out.push('\n');
    }
    out
}

/// `modules.softdep` in depmod's format (`softdep NAME pre: a b post: c`), naming only
/// modules that are in the image.
pub fn modules_softdep(chosen: &[ChosenModule]) -> String {
    let present: BTreeSet<&str> = chosen.iter().map(|m| m.name.as_str()).collect();
    let keep = |list: &[String]| -> Vec<String> {
        list.iter()
            .filter(|n| present.contains(n.as_str()))
            .cloned()
            .collect()
    };
    let mut out = String::new();
    for m in chosen {
        let (pre, post) = (keep(&m.softdep_pre), keep(&m.softdep_post));
        if pre.is_empty() && post.is_empty() {
            continue;
        }
        out.push_str("softdep ");
        out.push_str(&m.name);
        if !pre.is_empty() {
            out.push_str(" pre: ");
            out.push_str(&pre.join(" "));
        }
        if !post.is_empty() {
            out.push_str(" post: ");
            out.push_str(&post.join(" "));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_carry_compressed_modules_as_plain_ko() {
        assert_eq!(
            image_path("kernel/arch/x86/kvm/kvm-amd.ko.xz"),
            "kernel/arch/x86/kvm/kvm-amd.ko"
        );
        assert_eq!(image_path("extra/virtio_wl.ko"), "extra/virtio_wl.ko");
    }

    #[test]
    fn modinfo_fields_are_split_and_normalised() {
        let raw = b"license=GPL\0depends=vfio-pci-core,vfio\0name=vfio_pci\0softdep=pre: a-b post: vfio_iommu_type1 c\0vermagic=6.1.0-57-cloud-amd64 SMP mod_unload\0\0";
        let info = parse_modinfo(raw);
        assert_eq!(info.name.as_deref(), Some("vfio_pci"));
        assert_eq!(
            info.vermagic.as_deref(),
            Some("6.1.0-57-cloud-amd64 SMP mod_unload")
        );
        assert_eq!(info.depends, ["vfio_pci_core", "vfio"]);
        assert_eq!(info.softdep_pre, ["a_b"]);
        assert_eq!(info.softdep_post, ["vfio_iommu_type1", "c"]);
    }

    #[test]
    fn empty_depends_and_garbage_are_harmless() {
        let info = parse_modinfo(b"depends=\0\xff\xfe=\0noequals\0");
        assert!(info.depends.is_empty());
        assert_eq!(info, ModInfo::default());
    }

    fn cm(name: &str, deps: &[&str], post: &[&str]) -> ChosenModule {
        ChosenModule {
            name: name.into(),
            source: PathBuf::from(format!("/k/{name}.ko")),
            rel_path: format!("kernel/{name}.ko"),
            depends: deps.iter().map(|s| s.to_string()).collect(),
            softdep_pre: vec![],
            softdep_post: post.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn modules_dep_lists_transitive_deps_in_depmod_order() {
        let chosen = vec![
            cm("irqbypass", &[], &[]),
            cm("kvm", &["irqbypass"], &[]),
            cm("kvm_amd", &["kvm"], &[]),
            cm("vfio", &[], &["vfio_iommu_type1", "not_in_image"]),
            cm("vfio_iommu_type1", &[], &[]),
        ];
        let dep = modules_dep(&chosen);
        assert!(
            dep.contains("kernel/kvm_amd.ko: kernel/kvm.ko kernel/irqbypass.ko\n"),
            "{dep}"
        );
        assert!(dep.contains("kernel/irqbypass.ko:\n"));
        assert_eq!(
            modules_softdep(&chosen),
            "softdep vfio post: vfio_iommu_type1\n"
        );
    }
}
