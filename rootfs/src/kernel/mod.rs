//! Where provisioned kernels live: a cache outside the source tree
//! (`$BULKHEAD_CACHE`, else `$XDG_CACHE_HOME/bulkhead`, else `~/.cache/bulkhead`):
//!
//! * `kernel/<abi>/root/`: the unpacked `linux-image-<abi>` and the parts it is split into
//!   in newer kernels (`boot/vmlinuz-<abi>` and `lib/modules/<abi>/`, or
//!   `usr/lib/modules/<abi>/` with `vmlinuz` inside for newer packages);
//! * `kernel/<abi>/headers/`: the unpacked `linux-headers-<abi>` with the packages it needs
//!   (`-common`, `linux-kbuild-*`), what out-of-tree modules build against;
//! * `kernel/chosen/<suite>-<flavour>`: the ABI `provision` last found for that choice
//!   (`kernel/current` too for the default choice);
//! * `apt/<suite>/`: the private apt configuration and package lists of a suite the build
//!   machine's own apt sources do not name (see [`crate::apt`]).

pub mod choice;
pub mod plan;

use std::path::{Path, PathBuf};

pub use choice::{ChoiceOverride, Flavour, KernelChoice, Suite};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no provisioned {choice} in {dir}: run `bulkhead-rootfs provision{args}` first")]
    NotProvisioned {
        choice: KernelChoice,
        dir: PathBuf,
        args: String,
    },
    #[error("kernel {abi} in {dir} is incomplete ({missing} missing): run `bulkhead-rootfs provision` again")]
    Incomplete {
        abi: String,
        dir: PathBuf,
        missing: String,
    },
}

/// The `provision` arguments that fetch `choice` (empty for the default).
pub fn provision_args(choice: &KernelChoice) -> String {
    let mut s = String::new();
    if choice.flavour != Flavour::default() {
        s.push_str(" --flavour ");
        s.push_str(choice::flavour_name(choice.flavour));
    }
    if choice.suite != Suite::default() {
        s.push_str(" --suite ");
        s.push_str(choice.suite.name());
    }
    s
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The default location (see the module docs).
    pub fn default_location() -> Self {
        let dir = std::env::var_os("BULKHEAD_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("bulkhead"))
            })
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bulkhead")))
            .unwrap_or_else(|| PathBuf::from("/var/cache/bulkhead"));
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kernel_dir(&self, abi: &str) -> PathBuf {
        self.dir.join("kernel").join(abi)
    }

    /// The private apt state of a suite (`apt/<suite>`).
    pub fn apt_dir(&self, suite: &str) -> PathBuf {
        self.dir.join("apt").join(suite)
    }

    fn chosen_file(&self, choice: &KernelChoice) -> PathBuf {
        self.dir.join("kernel/chosen").join(choice.key())
    }

    /// Records `abi` as the kernel of `choice`.
    pub fn set_chosen(&self, choice: &KernelChoice, abi: &str) -> std::io::Result<()> {
        let f = self.chosen_file(choice);
        if let Some(parent) = f.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_atomically(&f, abi)?;
        if *choice == KernelChoice::default() {
            write_atomically(&self.dir.join("kernel/current"), abi)?;
        }
        Ok(())
    }

    /// The ABI recorded for `choice` (for the default choice, a cache from before choices
    /// existed has it in `kernel/current`).
    pub fn chosen(&self, choice: &KernelChoice) -> Option<String> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        read(self.chosen_file(choice)).or_else(|| {
            (*choice == KernelChoice::default())
                .then(|| read(self.dir.join("kernel/current")))
                .flatten()
        })
    }

    /// The default choice's ABI.
    pub fn current(&self) -> Option<String> {
        self.chosen(&KernelChoice::default())
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written name (the cache is shared by concurrent builds).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A provisioned kernel: its bzImage, its modules tree and the headers its out-of-tree
/// modules build against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub abi: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    /// `.../usr/src/linux-headers-<abi>` in the cache (present once `provision` fetched the
    /// headers).
    pub headers_dir: PathBuf,
}

impl Kernel {
    pub fn in_cache(cache: &Cache, abi: &str) -> Result<Self, KernelError> {
        let root = cache.kernel_dir(abi).join("root");
        // Debian 13's packages put modules under /usr (merged /usr), Debian 12's under /lib;
        // the bzImage is in /boot, or (kernels packaged after Debian 13's 6.12) next to the
        // modules.
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(abi))
            .find(|p| p.is_dir())
            .unwrap_or_else(|| root.join("lib/modules").join(abi));
        let vmlinuz = [
            root.join(format!("boot/vmlinuz-{abi}")),
            modules_dir.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| root.join(format!("boot/vmlinuz-{abi}")));
        for (p, what) in [(&vmlinuz, "vmlinuz"), (&modules_dir, "modules")] {
            if !p.exists() {
                return Err(KernelError::Incomplete {
                    abi: abi.to_string(),
                    dir: cache.kernel_dir(abi),
                    missing: what.to_string(),
                });
            }
        }
        Ok(Self {
            abi: abi.to_string(),
            vmlinuz,
            modules_dir,
            headers_dir: headers_dir(cache, abi),
        })
    }

    /// The kernel `provision` found for `choice`.
    pub fn chosen(cache: &Cache, choice: &KernelChoice) -> Result<Self, KernelError> {
        let abi = cache
            .chosen(choice)
            .ok_or_else(|| KernelError::NotProvisioned {
                choice: choice.clone(),
                dir: cache.dir().to_path_buf(),
                args: provision_args(choice),
            })?;
        Self::in_cache(cache, &abi)
    }

    /// The default kernel (the cloud kernel of the build machine's own suite).
    pub fn current(cache: &Cache) -> Result<Self, KernelError> {
        Self::chosen(cache, &KernelChoice::default())
    }
}

/// Where the headers of `abi` are unpacked: the root of the unpacked packages.
pub fn headers_root(cache: &Cache, abi: &str) -> PathBuf {
    cache.kernel_dir(abi).join("headers")
}

/// The headers directory of `abi` (what `make -C` is given).
pub fn headers_dir(cache: &Cache, abi: &str) -> PathBuf {
    headers_root(cache, abi).join(format!("usr/src/linux-headers-{abi}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_recorded_apart_and_the_default_also_as_current() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        assert_eq!(cache.chosen(&KernelChoice::second()), None);
        cache
            .set_chosen(&KernelChoice::second(), "6.12.95+deb12-cloud-amd64")
            .unwrap();
        assert_eq!(cache.current(), None);
        cache
            .set_chosen(&KernelChoice::default(), "6.1.0-57-cloud-amd64")
            .unwrap();
        assert_eq!(cache.current().as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(
            cache.chosen(&KernelChoice::second()).as_deref(),
            Some("6.12.95+deb12-cloud-amd64")
        );
        let e = Kernel::chosen(
            &cache,
            &KernelChoice {
                flavour: Flavour::Generic,
                suite: Suite::Backports,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("run `bulkhead-rootfs provision --flavour generic --suite backports`"),
            "{e}"
        );
    }

    #[test]
    fn modules_are_found_under_lib_or_usr_lib() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        for (abi, modules) in [
            ("6.1.0-57-cloud-amd64", "lib/modules"),
            ("6.12.117+deb13-cloud-amd64", "usr/lib/modules"),
        ] {
            let root = cache.kernel_dir(abi).join("root");
            std::fs::create_dir_all(root.join("boot")).unwrap();
            std::fs::write(root.join(format!("boot/vmlinuz-{abi}")), b"").unwrap();
            assert!(Kernel::in_cache(&cache, abi).is_err());
            std::fs::create_dir_all(root.join(modules).join(abi)).unwrap();
            let k = Kernel::in_cache(&cache, abi).unwrap();
            assert_eq!(k.modules_dir, root.join(modules).join(abi));
            assert_eq!(k.vmlinuz, root.join(format!("boot/vmlinuz-{abi}")));
        }
        // Newer packages: the bzImage next to the modules, no /boot.
        let abi = "7.3.4+deb13-cloud-amd64";
        let modules = cache.kernel_dir(abi).join("root/usr/lib/modules").join(abi);
        std::fs::create_dir_all(&modules).unwrap();
        assert!(Kernel::in_cache(&cache, abi).is_err());
        std::fs::write(modules.join("vmlinuz"), b"").unwrap();
        assert_eq!(
            Kernel::in_cache(&cache, abi).unwrap().vmlinuz,
            modules.join("vmlinuz")
        );
    }

    #[test]
    fn a_cache_from_before_choices_still_has_its_default_kernel() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("kernel")).unwrap();
        std::fs::write(dir.path().join("kernel/current"), "6.1.0-57-cloud-amd64\n").unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        assert_eq!(cache.current().as_deref(), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(cache.chosen(&KernelChoice::second()), None);
    }
}
