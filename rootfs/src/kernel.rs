//! Where provisioned kernels live: a cache outside the source tree
//! (`$BULKHEAD_CACHE`, else `$XDG_CACHE_HOME/bulkhead`, else `~/.cache/bulkhead`), one
//! directory per kernel ABI holding the unpacked Debian package.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no provisioned kernel in {0}: run `bulkhead-rootfs provision` first")]
    NotProvisioned(PathBuf),
    #[error("kernel {abi} in {dir} is incomplete ({missing} missing): run `bulkhead-rootfs provision` again")]
    Incomplete {
        abi: String,
        dir: PathBuf,
        missing: String,
    },
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

    pub fn set_current(&self, abi: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.join("kernel"))?;
        std::fs::write(self.dir.join("kernel/current"), abi)
    }

    pub fn current(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("kernel/current"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

/// A provisioned kernel: its bzImage and its modules tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub abi: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

impl Kernel {
    pub fn in_cache(cache: &Cache, abi: &str) -> Result<Self, KernelError> {
        let root = cache.kernel_dir(abi).join("root");
        let vmlinuz = root.join(format!("boot/vmlinuz-{abi}"));
        let modules_dir = root.join(format!("lib/modules/{abi}"));
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
        })
    }

    /// The kernel `provision` recorded as current.
    pub fn current(cache: &Cache) -> Result<Self, KernelError> {
        let abi = cache
            .current()
            .ok_or_else(|| KernelError::NotProvisioned(cache.dir().to_path_buf()))?;
        Self::in_cache(cache, &abi)
    }
}
