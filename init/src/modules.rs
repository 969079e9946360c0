//! Kernel modules: `modules.dep` / `modules.softdep` / `modules.builtin` in depmod format,
//! the load order they imply, and loading with finit_module(2).
//!
//! `modules.dep` lines look like
//! `kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko`,
//! paths relative to `/lib/modules/<release>`, with the dependencies listed so that the last
//! one must be loaded first (depmod's order). `modules.softdep` lines look like
//! `softdep vfio post: vfio_iommu_type1`. Module names normalise `-` to `_`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::path::{Path, PathBuf};

use log::{debug, error, info};

/// Largest index file init reads.
const MAX_INDEX_BYTES: u64 = 8 * 1024 * 1024;

/// Deepest dependency chain followed (guards against cycles in a broken index).
const MAX_DEPTH: usize = 32;

/// `kvm-amd` and `kvm_amd` are the same module.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path like `kernel/drivers/vfio/pci/vfio-pci.ko.xz`.
pub fn name_from_path(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalise(stem)
}

/// One module's entry in `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepEntry {
    /// Path of the module file, relative to the modules directory.
    pub path: String,
    /// Dependencies' paths in depmod order (load the last one first).
    pub deps: Vec<String>,
}

/// Soft dependencies of one module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoftDeps {
    /// Load these first.
    pub pre: Vec<String>,
    /// Load these after.
    pub post: Vec<String>,
}

/// The parsed index of one kernel's modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleIndex {
    /// Normalised name → entry.
    pub deps: BTreeMap<String, DepEntry>,
    /// Normalised name → soft deps (names, normalised).
    pub softdeps: BTreeMap<String, SoftDeps>,
    /// Normalised names of modules built into the kernel.
    pub builtin: BTreeSet<String>,
}

/// A problem with a module request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// Neither in modules.dep nor built in.
    #[error("module {0} not found in modules.dep")]
    Unknown(String),
    /// The dependency chain is deeper than any real one: the index is broken.
    #[error("module {0}: dependency chain too deep (cycle in modules.dep?)")]
    TooDeep(String),
}

/// One step of a load plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadStep {
    /// Normalised module name.
    pub name: String,
    /// Path relative to the modules directory.
    pub path: String,
}

/// Parses `modules.dep`. Malformed lines are skipped and returned as warnings.
pub fn parse_dep(text: &str) -> (BTreeMap<String, DepEntry>, Vec<String>) {
    let mut map = BTreeMap::new();
    let mut warnings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((path, deps)) = line.split_once(':') else {
            warnings.push(format!("modules.dep line {}: no ':'", n + 1));
            continue;
        };
        let path = path.trim();
        if path.is_empty() {
            warnings.push(format!("modules.dep line {}: empty module path", n + 1));
            continue;
        }
        let entry = DepEntry {
            path: path.to_string(),
            deps: deps.split_whitespace().map(str::to_string).collect(),
        };
        map.insert(name_from_path(path), entry);
    }
    (map, warnings)
}

/// Parses `modules.softdep` (`softdep <name> pre: a b post: c`).
pub fn parse_softdep(text: &str) -> BTreeMap<String, SoftDeps> {
    let mut map: BTreeMap<String, SoftDeps> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(name) = words.next() else { continue };
        let entry = map.entry(normalise(name)).or_default();
        let mut post = false;
        for w in words {
            match w {
                "pre:" => post = false,
                "post:" => post = true,
                dep if post => entry.post.push(normalise(dep)),
                dep => entry.pre.push(normalise(dep)),
            }
        }
    }
    map
}

/// Parses `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(name_from_path)
        .collect()
}

impl ModuleIndex {
    /// Reads the index files of a modules directory; missing softdep/builtin files are fine.
    pub fn load(dir: &Path) -> Result<(ModuleIndex, Vec<String>), std::io::Error> {
        let dep = read_bounded(&dir.join("modules.dep"))?;
        let (deps, warnings) = parse_dep(&dep);
        let softdeps = read_bounded(&dir.join("modules.softdep"))
            .map(|t| parse_softdep(&t))
            .unwrap_or_default();
        let builtin = read_bounded(&dir.join("modules.builtin"))
            .map(|t| parse_builtin(&t))
            .unwrap_or_default();
        Ok((
            ModuleIndex {
                deps,
                softdeps,
                builtin,
            },
            warnings,
        ))
    }

    /// The modules to load, in order, to load `name`: soft pre-deps, hard deps (deepest
    /// first), the module, soft post-deps. Built-in modules are left out. A soft dep that
    /// is not in the index is skipped, as modprobe does.
    pub fn plan(&self, name: &str) -> Result<Vec<LoadStep>, ModuleError> {
        let mut plan = Vec::new();
        let mut seen = BTreeSet::new();
        self.visit(&normalise(name), true, 0, &mut seen, &mut plan)?;
        Ok(plan)
    }

    fn visit(
        &self,
        name: &str,
        required: bool,
        depth: usize,
        seen: &mut BTreeSet<String>,
        plan: &mut Vec<LoadStep>,
    ) -> Result<(), ModuleError> {
        if depth > MAX_DEPTH {
            return Err(ModuleError::TooDeep(name.to_string()));
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let soft = self.softdeps.get(name);
        if let Some(soft) = soft {
            for pre in &soft.pre {
                self.visit(pre, false, depth + 1, seen, plan)?;
            }
        }
        if self.builtin.contains(name) {
            debug!("module {name} is built in");
        } else {
            match self.deps.get(name) {
                Some(entry) => {
                    // depmod lists the dependency to load last first: walk them in reverse.
                    for dep in entry.deps.iter().rev() {
                        self.visit(&name_from_path(dep), true, depth + 1, seen, plan)?;
                    }
                    plan.push(LoadStep {
                        name: name.to_string(),
                        path: entry.path.clone(),
                    });
                }
                None if required => return Err(ModuleError::Unknown(name.to_string())),
                None => debug!("soft dependency {name} not available, skipped"),
            }
        }
        if let Some(soft) = soft {
            for post in &soft.post {
                self.visit(post, false, depth + 1, seen, plan)?;
            }
        }
        Ok(())
    }
}

fn read_bounded(path: &Path) -> Result<String, std::io::Error> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_INDEX_BYTES)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// `/lib/modules/<uname -r>`.
pub fn modules_dir() -> PathBuf {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    Path::new("/lib/modules").join(release)
}

/// What happened to one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadOutcome {
    /// finit_module succeeded.
    Loaded,
    /// EEXIST: already there.
    AlreadyLoaded,
}

/// Loads one module file with finit_module(2). Compressed files (`.ko.xz`, `.ko.zst`,
/// `.ko.gz`) are handed to the kernel with MODULE_INIT_COMPRESSED_FILE.
pub fn load_file(path: &Path) -> Result<LoadOutcome, String> {
    use nix::kmod::{finit_module, ModuleInitFlags};
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        // MODULE_INIT_COMPRESSED_FILE, not named by nix.
        ModuleInitFlags::from_bits_retain(4)
    } else {
        ModuleInitFlags::empty()
    };
    let params = CString::default();
    match finit_module(&file, &params, flags) {
        Ok(()) => Ok(LoadOutcome::Loaded),
        Err(nix::errno::Errno::EEXIST) => Ok(LoadOutcome::AlreadyLoaded),
        Err(e) => Err(format!("finit_module {}: {e}", path.display())),
    }
}

/// Loads each requested module with its dependencies, logging every step. Failures are
/// logged and never fatal. Returns the names of modules loaded or already present.
pub fn load_all(dir: &Path, requested: &[String]) -> BTreeSet<String> {
    let mut present = BTreeSet::new();
    if requested.is_empty() {
        return present;
    }
    let index = match ModuleIndex::load(dir) {
        Ok((index, warnings)) => {
            for w in warnings {
                log::warn!("{}: {w}", dir.display());
            }
            index
        }
        Err(e) => {
            error!(
                "cannot read {}: {e}; no modules loaded",
                dir.join("modules.dep").display()
            );
            return present;
        }
    };
    for want in requested {
        let plan = match index.plan(want) {
            Ok(plan) => plan,
            Err(e) => {
                if index.builtin.contains(&normalise(want)) {
                    present.insert(normalise(want));
                } else {
                    error!("cannot load module {want}: {e}");
                }
                continue;
            }
        };
        if plan.is_empty() {
            present.insert(normalise(want));
        }
        for step in plan {
            if present.contains(&step.name) {
                continue;
            }
            match load_file(&dir.join(&step.path)) {
                Ok(LoadOutcome::Loaded) => {
                    info!("loaded module {}", step.name);
                    present.insert(step.name);
                }
                Ok(LoadOutcome::AlreadyLoaded) => {
                    info!("module {} already loaded", step.name);
                    present.insert(step.name);
                }
                Err(e) => error!("cannot load module {} (for {want}): {e}", step.name),
            }
        }
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/vfio/vfio.ko:
kernel/drivers/vfio/vfio_iommu_type1.ko: kernel/drivers/vfio/vfio.ko
kernel/drivers/vfio/vfio_virqfd.ko:
kernel/drivers/vfio/pci/vfio-pci-core.ko: kernel/drivers/vfio/vfio.ko kernel/drivers/vfio/vfio_virqfd.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko kernel/drivers/vfio/vfio.ko
kernel/drivers/input/evdev.ko:
garbage line without colon
";
    const SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep vfio post: vfio_iommu_type1
softdep evdev pre: fake-pre post: missing_post
";

    fn index() -> ModuleIndex {
        let (deps, warnings) = parse_dep(DEP);
        assert_eq!(warnings.len(), 1);
        ModuleIndex {
            deps,
            softdeps: parse_softdep(SOFTDEP),
            builtin: parse_builtin("kernel/drivers/acpi/button.ko\n"),
        }
    }

    fn names(plan: &[LoadStep]) -> Vec<&str> {
        plan.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn names_normalise() {
        assert_eq!(
            name_from_path("kernel/drivers/vfio/pci/vfio-pci.ko.xz"),
            "vfio_pci"
        );
        assert_eq!(name_from_path("a/kvm-amd.ko"), "kvm_amd");
        assert_eq!(normalise("kvm-amd"), "kvm_amd");
    }

    #[test]
    fn hard_deps_load_deepest_first() {
        let plan = index().plan("kvm-amd").unwrap();
        assert_eq!(names(&plan), vec!["irqbypass", "kvm", "kvm_amd"]);
        assert_eq!(plan[2].path, "kernel/arch/x86/kvm/kvm-amd.ko");
    }

    #[test]
    fn softdep_post_follows_and_each_module_once() {
        let plan = index().plan("vfio_pci").unwrap();
        assert_eq!(
            names(&plan),
            vec![
                "vfio",
                "vfio_iommu_type1",
                "irqbypass",
                "vfio_virqfd",
                "vfio_pci_core",
                "vfio_pci"
            ]
        );
    }

    #[test]
    fn missing_soft_deps_are_skipped_missing_modules_are_errors() {
        assert_eq!(names(&index().plan("evdev").unwrap()), vec!["evdev"]);
        assert_eq!(
            index().plan("nosuch"),
            Err(ModuleError::Unknown("nosuch".to_string()))
        );
    }

    #[test]
    fn builtin_modules_need_no_loading() {
        assert!(index().plan("button").unwrap().is_empty());
    }

    #[test]
    fn cycles_terminate() {
        let (deps, _) = parse_dep("a.ko: b.ko\nb.ko: a.ko\n");
        let idx = ModuleIndex {
            deps,
            ..Default::default()
        };
        assert_eq!(names(&idx.plan("a").unwrap()), vec!["b", "a"]);
    }

    #[test]
    fn softdep_parsing() {
        let s = parse_softdep("softdep a pre: b c post: d\nsoftdep x-y post: z-w\nnoise\n");
        assert_eq!(s["a"].pre, vec!["b", "c"]);
        assert_eq!(s["a"].post, vec!["d"]);
        assert_eq!(s["x_y"].post, vec!["z_w"]);
    }
}
