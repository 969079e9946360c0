//! Debian's systemd-stub (`linuxx64.efi.stub` from the package `systemd-boot-efi`, the
//! build machine's own suite), downloaded and unpacked into the cache like the kernels
//! are: `apt-get download` and `dpkg-deb -x`, nothing installed on the build machine.

use std::path::{Path, PathBuf};

use super::EfiError;
use crate::apt::Apt;
use crate::kernel::Cache;
use crate::provision::ProvisionError;

/// The Debian package that carries the stub.
pub const PACKAGE: &str = "systemd-boot-efi";
/// The stub inside the unpacked package.
pub const STUB_IN_PACKAGE: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// Where the stub's package is unpacked in the cache.
pub fn dir(cache: &Cache) -> PathBuf {
    cache.dir().join("efi-stub")
}

fn complete_marker(cache: &Cache) -> PathBuf {
    dir(cache).join(".complete")
}

/// The stub in the cache, if `provision` fetched it.
pub fn in_cache(cache: &Cache) -> Result<PathBuf, EfiError> {
    let stub = dir(cache).join("root").join(STUB_IN_PACKAGE);
    if complete_marker(cache).exists() && stub.is_file() {
        Ok(stub)
    } else {
        Err(EfiError::NoStub { path: stub })
    }
}

/// The package version recorded when the stub was fetched (`252.39-1~deb12u2`).
pub fn version(cache: &Cache) -> Option<String> {
    std::fs::read_to_string(complete_marker(cache))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The version in a downloaded .deb's name (`systemd-boot-efi_252.39-1~deb12u2_amd64.deb`;
/// apt writes `:` of an epoch as `%3a`).
pub fn version_of_deb(file_name: &str) -> Option<String> {
    let rest = file_name.strip_prefix(&format!("{PACKAGE}_"))?;
    let (version, _arch) = rest.strip_suffix(".deb")?.rsplit_once('_')?;
    (!version.is_empty()).then(|| version.replace("%3a", ":"))
}

/// Makes sure the stub is unpacked in the cache (fetching the package lists first when
/// apt has none and we are root); returns its path.
pub fn ensure(cache: &Cache) -> Result<PathBuf, ProvisionError> {
    if let Ok(stub) = in_cache(cache) {
        log::info!(
            "systemd-stub {} already in {}",
            version(cache).unwrap_or_default(),
            stub.display()
        );
        return Ok(stub);
    }
    let apt = Apt::system();
    let d = dir(cache);
    let dl = d.join("dl");
    let root = d.join("root");
    let pkgs = [PACKAGE.to_string()];
    // Keep the .deb's name (its version) before fetch_and_unpack removes the download.
    let mut fetched = None;
    let mut fetch = || -> Result<(), ProvisionError> {
        let _ = std::fs::remove_dir_all(&dl);
        let debs = apt.download(&pkgs, &dl)?;
        fetched = debs
            .first()
            .and_then(|p| p.file_name())
            .and_then(|n| version_of_deb(&n.to_string_lossy()));
        unpack(&debs, &root)?;
        let _ = std::fs::remove_dir_all(&dl);
        Ok(())
    };
    log::info!("downloading {PACKAGE} into {} (not installed)", d.display());
    if let Err(e) = fetch() {
        if !nix::unistd::geteuid().is_root() {
            return Err(e);
        }
        // Perhaps only stale package lists.
        apt.update()?;
        fetch()?;
    }
    let stub = root.join(STUB_IN_PACKAGE);
    if !stub.is_file() {
        return Err(ProvisionError::Io {
            path: stub,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{PACKAGE} unpacked without its x86-64 stub"),
            ),
        });
    }
    let marker = complete_marker(cache);
    std::fs::write(&marker, fetched.unwrap_or_default()).map_err(|source| ProvisionError::Io {
        path: marker.clone(),
        source,
    })?;
    Ok(stub)
}

/// Unpacks downloaded .debs into `root` (emptied first).
fn unpack(debs: &[PathBuf], root: &Path) -> Result<(), ProvisionError> {
    let _ = std::fs::remove_dir_all(root);
    for deb in debs {
        crate::apt::run(
            std::process::Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(root),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_comes_from_the_debs_name() {
        assert_eq!(
            version_of_deb("systemd-boot-efi_252.39-1~deb12u2_amd64.deb").as_deref(),
            Some("252.39-1~deb12u2")
        );
        assert_eq!(
            version_of_deb("systemd-boot-efi_1%3a257-2_amd64.deb").as_deref(),
            Some("1:257-2")
        );
        assert_eq!(version_of_deb("systemd-boot_252_amd64.deb"), None);
        assert_eq!(version_of_deb("systemd-boot-efi__amd64.deb"), None);
    }
}
