//! Our out-of-tree kernel modules (the virtio_wl guest driver), built for each kernel an
//! image boots against that kernel's Debian `linux-headers-<abi>`, unpacked in the cache by
//! `provision` (never installed), into the build directory (never the source tree).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kernel::Kernel;

/// Module name → source directory (relative to the workspace).
pub const OUT_OF_TREE: &[(&str, &str)] = &[("virtio_wl", "rootfs/guest/virtio_wl")];

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel headers for {abi} are missing ({dir}): run `bulkhead-rootfs provision` (it unpacks linux-headers-{abi} into the cache)")]
    NoHeaders { abi: String, dir: PathBuf },
    #[error("building {name} failed: {detail}")]
    Build { name: String, detail: String },
}

/// Is `name` one of ours?
pub fn source_dir(workspace: &Path, name: &str) -> Option<PathBuf> {
    let n = crate::modules::normalize(name);
    OUT_OF_TREE
        .iter()
        .find(|(m, _)| *m == n)
        .map(|(_, dir)| workspace.join(dir))
}

fn copy_sources(from: &Path, to: &Path) -> Result<(), KmodError> {
    copy_tree(from, to, false)
}

/// Copies Kbuild, Makefile, `*.c` and `*.h`, and everything under `include/`.
fn copy_tree(from: &Path, to: &Path, in_include: bool) -> Result<(), KmodError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KmodError::Io { path, source }
    };
    std::fs::create_dir_all(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let p = entry.path();
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if p.is_dir() {
            if in_include || name_s == "include" {
                copy_tree(&p, &to.join(&name), true)?;
            }
        } else if name_s == "Kbuild"
            || name_s == "Makefile"
            || name_s.ends_with(".c")
            || name_s.ends_with(".h")
        {
            std::fs::copy(&p, to.join(&name)).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// Builds module `name` for `kernel` and returns the `.ko`.
pub fn build(workspace: &Path, name: &str, kernel: &Kernel) -> Result<PathBuf, KmodError> {
    let abi = &kernel.abi;
    let src = source_dir(workspace, name).ok_or_else(|| KmodError::Build {
        name: name.to_string(),
        detail: "not one of our out-of-tree modules".into(),
    })?;
    let headers = &kernel.headers_dir;
    if !headers.join("Makefile").exists() {
        return Err(KmodError::NoHeaders {
            abi: abi.to_string(),
            dir: headers.clone(),
        });
    }
    let n = crate::modules::normalize(name);
    let out = workspace.join("target/bulkhead/kmod").join(abi).join(&n);
    copy_sources(&src, &out)?;
    let res = Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", out.display()))
        .arg("modules")
        .output()
        .map_err(|e| KmodError::Build {
            name: n.clone(),
            detail: format!("make: {e} (install make and gcc: `bulkhead-rootfs provision`)"),
        })?;
    if !res.status.success() {
        return Err(KmodError::Build {
            name: n,
            detail: format!(
                "{}\n{}",
                String::from_utf8_lossy(&res.stdout),
                String::from_utf8_lossy(&res.stderr)
            ),
        });
    }
    Ok(out.join(format!("{n}.ko")))
}
