//! `bulkhead-rootfs provision`: everything a fresh Debian machine needs to build and boot
//! Bulkhead: QEMU from Debian's packages, and the current Debian cloud kernel with its
//! modules unpacked into a cache outside the source tree. Safe to run again: work already
//! done is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kernel::{Cache, Kernel};

/// Debian packages the build and boot need.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    // mkfs.ext4 -d: guests' Debian root filesystems (`boot` builds the example's).
    "e2fsprogs",
];

/// Debian packages only the tests need, installed by the `provision` command (not by `boot`
/// or the benches): the Wayland proxies' tests run real weston and stock clients
/// (`rootfs/guest/wayland/tests`); Xvfb gives weston a seat for keymaps and the clipboard.
pub const TEST_PACKAGES: &[&str] = &["weston", "wl-clipboard", "wayland-utils", "xvfb"];

/// The metapackage that names the current cloud kernel ABI.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("missing Debian packages {missing:?}; as root, run: {command}")]
    NotRoot {
        missing: Vec<String>,
        command: String,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error(
        "could not find the kernel ABI in `apt-cache depends {KERNEL_METAPACKAGE}` output: {0:?}"
    )]
    NoAbi(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn run(cmd: &mut Command) -> Result<String, ProvisionError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| ProvisionError::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ProvisionError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Is a Debian package installed?
pub fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn apt_install_line(pkgs: &[String]) -> String {
    format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        pkgs.join(" ")
    )
}

/// Installs the packages that are missing (as root), or says exactly what to run.
pub fn ensure_packages(pkgs: &[&str]) -> Result<(), ProvisionError> {
    let missing: Vec<String> = pkgs
        .iter()
        .filter(|p| !installed(p))
        .map(|p| p.to_string())
        .collect();
    if missing.is_empty() {
        log::info!("packages present: {}", pkgs.join(" "));
        return Ok(());
    }
    if !is_root() {
        return Err(ProvisionError::NotRoot {
            command: apt_install_line(&missing),
            missing,
        });
    }
    log::info!("installing {}", missing.join(" "));
    apt_update()?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))?;
    Ok(())
}

fn apt_update() -> Result<(), ProvisionError> {
    run(Command::new("apt-get").args(["update", "-q"])).map(|_| ())
}

/// Parses `apt-cache depends linux-image-cloud-amd64` for the ABI it depends on.
pub fn parse_abi(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        let abi = dep.strip_prefix("linux-image-")?;
        let ok = !abi.is_empty()
            && abi
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '+');
        ok.then(|| abi.to_string())
    })
}

/// The current cloud kernel ABI according to apt (updating the package lists once if they
/// know nothing yet and we are root).
pub fn current_abi() -> Result<String, ProvisionError> {
    let query = || run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]));
    match query().ok().as_deref().and_then(parse_abi) {
        Some(abi) => Ok(abi),
        None if is_root() => {
            apt_update()?;
            let out = query()?;
            parse_abi(&out).ok_or(ProvisionError::NoAbi(out))
        }
        None => Err(ProvisionError::NoAbi(
            "no package lists; run `apt-get update` as root".into(),
        )),
    }
}

/// Downloads one package's .deb into `dir` and unpacks it into `root`.
fn fetch_and_unpack(pkg: &str, dir: &Path, root: &Path) -> Result<(), ProvisionError> {
    std::fs::create_dir_all(dir).map_err(|source| ProvisionError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    run(Command::new("apt-get")
        .current_dir(dir)
        // apt's download sandbox user cannot write into root's cache.
        .args(["-q", "-o", "APT::Sandbox::User=root", "download", pkg]))?;
    let deb = std::fs::read_dir(dir)
        .map_err(|source| ProvisionError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                .unwrap_or(false)
        })
        .ok_or_else(|| ProvisionError::Command {
            command: format!("apt-get download {pkg}"),
            detail: "no .deb appeared".into(),
        })?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    Ok(())
}

/// Makes sure the kernel for `abi` is unpacked in the cache and recorded as current.
pub fn ensure_kernel(cache: &Cache, abi: &str) -> Result<Kernel, ProvisionError> {
    let dir = cache.kernel_dir(abi);
    let done = dir.join(".complete");
    if !done.exists() {
        log::info!("downloading linux-image-{abi} into {}", dir.display());
        let root = dir.join("root");
        let _ = std::fs::remove_dir_all(&root);
        fetch_and_unpack(&format!("linux-image-{abi}"), &dir.join("dl"), &root)?;
        std::fs::write(&done, b"").map_err(|source| ProvisionError::Io {
            path: done.clone(),
            source,
        })?;
    } else {
        log::info!("kernel {abi} already in {}", dir.display());
    }
    cache
        .set_current(abi)
        .map_err(|source| ProvisionError::Io {
            path: cache.dir().to_path_buf(),
            source,
        })?;
    Kernel::in_cache(cache, abi).map_err(|e| ProvisionError::Command {
        command: "locate the unpacked kernel".into(),
        detail: e.to_string(),
    })
}

/// The whole `provision` command: QEMU, the kernel, and what building our out-of-tree
/// guest modules needs (that kernel's headers, make, gcc).
pub fn provision(cache: &Cache) -> Result<Kernel, ProvisionError> {
    ensure_packages(PACKAGES)?;
    let abi = current_abi()?;
    log::info!("current Debian cloud kernel ABI: {abi}");
    let headers = format!("linux-headers-{abi}");
    ensure_packages(&[headers.as_str(), "make", "gcc"])?;
    ensure_kernel(cache, &abi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_is_read_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(parse_abi(out).as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(parse_abi("linux-image-cloud-amd64\n"), None);
        assert_eq!(parse_abi("  Depends: linux-image-6.1;rm -rf /\n"), None);
    }

    #[test]
    fn the_install_line_names_every_missing_package() {
        assert_eq!(
            apt_install_line(&["a".into(), "b".into()]),
            "apt-get update && apt-get install -y --no-install-recommends a b"
        );
    }
}
