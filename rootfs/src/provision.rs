//! `bulkhead-rootfs provision`: everything a fresh Debian machine needs to build and boot
//! Bulkhead: QEMU and the tools that build our out-of-tree guest module, from Debian's
//! packages, and each chosen Debian kernel with its modules and its headers unpacked into
//! a cache outside the source tree. No kernel is ever installed on the build machine.
//! Safe to run again: work already done is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apt::{self, parse_depends, Apt, AptError};
use crate::kernel::{self, choice, Cache, Kernel, KernelChoice};

/// Debian packages the build and boot need.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    // mkfs.ext4 -d: guests' Debian root filesystems (`boot` builds the example's).
    "e2fsprogs",
    // objcopy: `build --efi` adds the kernel, initramfs and command line to systemd-stub.
    "binutils",
    // OVMF: UEFI firmware that `boot --efi` and the EFI test boot the unified image with.
    "ovmf",
];

/// What building an out-of-tree module against unpacked headers needs on the build
/// machine, besides the compiler the headers name: `make`, `gcc`, and `pahole` (package
/// dwarves), which writes a module's BTF when the headers carry a `vmlinux` (6.12 does).
pub const BUILD_TOOLS: &[&str] = &["make", "gcc", "dwarves"];

/// Debian packages only the tests need, installed by the `provision` command (not by `boot`
/// or the benches): the Wayland proxies' tests run real weston and stock clients
/// (`rootfs/guest/wayland/tests`); Xvfb gives weston a seat for keymaps and the clipboard.
/// bulkhead-netd's test runs it in network namespaces of its own (`unshare`, util-linux)
/// with a bridge and veth pairs made by iproute2 (`rootfs/guest/netd/tests`).
pub const TEST_PACKAGES: &[&str] = &[
    "weston",
    "wl-clipboard",
    "wayland-utils",
    "xvfb",
    "iproute2",
    "util-linux",
];

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("missing Debian packages {missing:?}; as root, run: {command}")]
    NotRoot {
        missing: Vec<String>,
        command: String,
    },
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error("could not find the kernel ABI of {metapackage} in {source_desc}: {detail}")]
    NoAbi {
        metapackage: String,
        source_desc: String,
        detail: String,
    },
    #[error("the headers of {abi} need {packages:?} on the build machine, which its apt cannot install ({detail}); a kernel of a newer Debian release needs a build machine of that release (on Debian 12, the 6.12 line is suite \"backports\")")]
    Tools {
        abi: String,
        packages: Vec<String>,
        detail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.to_path_buf(),
        source,
    }
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
    let install = || {
        apt::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
    };
    if install().is_err() {
        // Perhaps only stale package lists.
        Apt::system().update()?;
        install()?;
    }
    Ok(())
}

/// Parses `apt-cache depends <metapackage>` for the kernel ABI it depends on.
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

/// The current kernel ABI of `flavour` in `apt`'s suite (fetching the package lists first
/// when there are none, or when `refresh` asks and the lists are private).
pub fn current_abi(
    apt: &Apt,
    flavour: kernel::Flavour,
    refresh: bool,
) -> Result<String, ProvisionError> {
    let meta = choice::metapackage(flavour);
    if !apt.is_system() && (refresh || !apt.has_lists()) {
        log::info!("fetching the package lists of {}", apt.describe());
        apt.update()?;
    }
    let no_abi = |detail: String| ProvisionError::NoAbi {
        metapackage: meta.to_string(),
        source_desc: apt.describe(),
        detail,
    };
    match apt.depends(meta).ok().as_deref().and_then(parse_abi) {
        Some(abi) => Ok(abi),
        None if apt.is_system() && !is_root() => Err(no_abi(
            "no package lists; run `apt-get update` as root".into(),
        )),
        None => {
            apt.update()?;
            let out = apt.depends(meta)?;
            parse_abi(&out).ok_or_else(|| no_abi(out))
        }
    }
}

/// Downloads `pkgs` into `dl`, unpacks them all into `root` (emptied first), and removes
/// the downloads.
fn fetch_and_unpack(
    apt: &Apt,
    pkgs: &[String],
    dl: &Path,
    root: &Path,
) -> Result<(), ProvisionError> {
    let _ = std::fs::remove_dir_all(root);
    let _ = std::fs::remove_dir_all(dl);
    let debs = apt.download(pkgs, dl)?;
    for deb in &debs {
        apt::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }
    let _ = std::fs::remove_dir_all(dl);
    Ok(())
}

/// What to do with a dependency of a kernel's image or headers package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dep {
    /// Another part of the same kernel: download and unpack it with the package.
    Unpack,
    /// Needed on the build machine to build modules (a compiler, a library the kbuild
    /// programs link): install it.
    Install,
    /// Neither (the image for the headers, linux-base's hooks, initramfs tools).
    Skip,
}

/// Sorts a dependency of `linux-image-<abi>` (`headers` false) or `linux-headers-<abi>`
/// (`headers` true). Debian 12's and 13's 6.x image package holds the whole kernel; newer
/// ones are split into `linux-base-<abi>`, `linux-binary-<abi>` and `linux-modules-<abi>`,
/// which are unpacked with it; headers bring `-common` and `linux-kbuild-*`.
fn classify(dep: &str, abi: &str, headers: bool) -> Dep {
    if dep == "linux-base" || dep.starts_with("linux-image-") {
        Dep::Skip
    } else if dep.starts_with("linux-") && dep.ends_with(&format!("-{abi}")) {
        Dep::Unpack
    } else if !headers {
        Dep::Skip
    } else if dep.starts_with("linux-headers-") || dep.starts_with("linux-kbuild-") {
        Dep::Unpack
    } else {
        Dep::Install
    }
}

/// `first` and the packages of the same kernel it depends on, directly or not; and what
/// the build machine needs installed for them.
fn kernel_packages(
    apt: &Apt,
    first: String,
    abi: &str,
    headers: bool,
) -> Result<(Vec<String>, Vec<String>), ProvisionError> {
    let mut pkgs = vec![first];
    let mut tools: Vec<String> = Vec::new();
    let mut i = 0;
    while let Some(pkg) = pkgs.get(i).cloned() {
        for dep in parse_depends(&apt.depends(&pkg)?) {
            match classify(&dep, abi, headers) {
                Dep::Unpack if !pkgs.contains(&dep) => pkgs.push(dep),
                Dep::Install if !tools.contains(&dep) => tools.push(dep),
                _ => {}
            }
        }
        i += 1;
    }
    Ok((pkgs, tools))
}

/// Makes sure the kernel image of `abi` (`linux-image-<abi>` and its parts) is unpacked in
/// the cache.
pub fn ensure_kernel(cache: &Cache, apt: &Apt, abi: &str) -> Result<(), ProvisionError> {
    let dir = cache.kernel_dir(abi);
    let done = dir.join(".complete");
    if done.exists() {
        if Kernel::in_cache(cache, abi).is_ok() {
            log::info!("kernel {abi} already in {}", dir.display());
            return Ok(());
        }
        log::warn!(
            "kernel {abi} in {} is incomplete: fetching it again",
            dir.display()
        );
    }
    let (pkgs, _) = kernel_packages(apt, format!("linux-image-{abi}"), abi, false)?;
    log::info!("downloading {} into {}", pkgs.join(" "), dir.display());
    fetch_and_unpack(apt, &pkgs, &dir.join("dl"), &dir.join("root"))?;
    std::fs::write(&done, b"").map_err(io(&done))
}

/// Points the absolute paths in the headers' Makefile (`include /usr/src/…`,
/// `KBUILD_OUTPUT=/usr/src/…`) that name something unpacked under `root` at the unpacked
/// copies. A path is a word that starts with `/` at the start of a line or after a space or
/// `=`.
pub fn relocate_makefile(text: &str, root: &Path) -> String {
    let prefix = root.display().to_string();
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let mut rest = line;
        let mut at_word_start = true;
        while let Some(c) = rest.chars().next() {
            if c == '/' && at_word_start {
                let end = rest
                    .find(|ch: char| ch.is_whitespace())
                    .unwrap_or(rest.len());
                let (path, after) = rest.split_at(end);
                if root.join(path.trim_start_matches('/')).exists() {
                    out.push_str(&prefix);
                }
                out.push_str(path);
                rest = after;
                at_word_start = false;
                continue;
            }
            out.push(c);
            at_word_start = c == ' ' || c == '=' || c == '\t';
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Makes sure the headers of `abi` (linux-headers-<abi> with the -common and kbuild packages
/// it depends on) are unpacked in the cache, and returns the Debian packages the build
/// machine needs to build against them (recorded, so a later run asks apt nothing).
pub fn ensure_headers(cache: &Cache, apt: &Apt, abi: &str) -> Result<Vec<String>, ProvisionError> {
    let dir = cache.kernel_dir(abi);
    let done = dir.join(".headers-complete");
    if let Ok(text) = std::fs::read_to_string(&done) {
        log::info!("headers of {abi} already in {}", dir.display());
        return Ok(text.lines().map(str::to_string).collect());
    }
    let headers = format!("linux-headers-{abi}");
    let (pkgs, tools) = kernel_packages(apt, headers.clone(), abi, true)?;
    log::info!(
        "downloading {} into {} (not installed)",
        pkgs.join(" "),
        dir.display()
    );
    let root = kernel::headers_root(cache, abi);
    fetch_and_unpack(apt, &pkgs, &dir.join("dl-headers"), &root)?;
    let src = root.join("usr/src");
    let rd = std::fs::read_dir(&src).map_err(io(&src))?;
    for e in rd.flatten() {
        let mk = e.path().join("Makefile");
        if mk.is_file() && !mk.is_symlink() {
            let text = std::fs::read_to_string(&mk).map_err(io(&mk))?;
            let moved = relocate_makefile(&text, &root);
            if moved != text {
                std::fs::write(&mk, moved).map_err(io(&mk))?;
            }
        }
    }
    let headers_dir = kernel::headers_dir(cache, abi);
    if !headers_dir.join("Makefile").is_file() {
        return Err(ProvisionError::Io {
            path: headers_dir,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{headers} unpacked without its Makefile"),
            ),
        });
    }
    let mut record = tools.join("\n");
    record.push('\n');
    std::fs::write(&done, record).map_err(io(&done))?;
    Ok(tools)
}

/// Fetches `choice`'s current kernel and headers into the cache, installs what building
/// against them needs, records the ABI for the choice, and returns the kernel.
pub fn provision_kernel(
    cache: &Cache,
    choice: &KernelChoice,
    refresh: bool,
) -> Result<Kernel, ProvisionError> {
    let apt = Apt::for_suite(cache, &choice.suite)?;
    let abi = current_abi(&apt, choice.flavour, refresh)?;
    log::info!("{choice}: {abi} ({})", apt.describe());
    ensure_kernel(cache, &apt, &abi)?;
    let tools = ensure_headers(cache, &apt, &abi)?;
    let mut need: Vec<&str> = BUILD_TOOLS.to_vec();
    need.extend(tools.iter().map(String::as_str));
    match ensure_packages(&need) {
        Err(ProvisionError::Apt(e)) => {
            return Err(ProvisionError::Tools {
                abi,
                packages: tools,
                detail: e.to_string(),
            })
        }
        r => r?,
    }
    cache.set_chosen(choice, &abi).map_err(io(cache.dir()))?;
    Ok(Kernel::in_cache(cache, &abi)?)
}

/// The whole `provision` command: QEMU and the EFI tools, systemd-stub (into the cache),
/// then every kernel in `choices` (each once).
pub fn provision(
    cache: &Cache,
    choices: &[KernelChoice],
    refresh: bool,
) -> Result<Vec<Kernel>, ProvisionError> {
    ensure_packages(PACKAGES)?;
    crate::efi::stub::ensure(cache)?;
    let mut done: Vec<&KernelChoice> = Vec::new();
    let mut kernels = Vec::new();
    for c in choices {
        if !done.contains(&c) {
            kernels.push(provision_kernel(cache, c, refresh)?);
            done.push(c);
        }
    }
    Ok(kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_is_read_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(parse_abi(out).as_deref(), Some("6.1.0-56-cloud-amd64"));
        let bpo = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
        assert_eq!(parse_abi(bpo).as_deref(), Some("6.12.95+deb12-amd64"));
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

    #[test]
    fn headers_bring_their_kbuild_and_common_packages_and_install_nothing_of_the_kernel() {
        let abi = "6.12.95+deb12-cloud-amd64";
        let h = |dep| classify(dep, abi, true);
        assert_eq!(h("linux-headers-6.12.95+deb12-common"), Dep::Unpack);
        assert_eq!(h("linux-kbuild-6.12.95+deb12"), Dep::Unpack);
        assert_eq!(
            classify("linux-kbuild-6.1", "6.1.0-57-cloud-amd64", true),
            Dep::Unpack
        );
        assert_eq!(h("linux-image-6.12.95+deb12-cloud-amd64"), Dep::Skip);
        assert_eq!(h("linux-base"), Dep::Skip);
        assert_eq!(h("gcc-12"), Dep::Install);
        assert_eq!(h("linux-compiler-gcc-12-x86"), Dep::Install);
        // A newer kernel's per-ABI base files come along instead of being installed.
        assert_eq!(
            classify(
                "linux-base-7.3.4+deb13-cloud-amd64",
                "7.3.4+deb13-cloud-amd64",
                true
            ),
            Dep::Unpack
        );
    }

    #[test]
    fn a_split_kernel_image_is_unpacked_whole_and_its_boot_tools_are_not_installed() {
        let abi = "7.3.4+deb13-cloud-amd64";
        for part in ["linux-base-", "linux-binary-", "linux-modules-"] {
            assert_eq!(classify(&format!("{part}{abi}"), abi, false), Dep::Unpack);
        }
        for other in ["linux-base", "kmod", "initramfs-tools", "linux-headers-x"] {
            assert_eq!(classify(other, abi, false), Dep::Skip, "{other}");
        }
    }

    #[test]
    fn the_headers_makefile_includes_the_unpacked_common_makefile() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let common = root.join("usr/src/linux-headers-6.12.95+deb12-common");
        std::fs::create_dir_all(&common).unwrap();
        std::fs::write(common.join("Makefile"), "").unwrap();
        let text = "include /usr/src/linux-headers-6.12.95+deb12-common/Makefile\n";
        assert_eq!(
            relocate_makefile(text, root),
            format!(
                "include {}/usr/src/linux-headers-6.12.95+deb12-common/Makefile\n",
                root.display()
            )
        );
        // A line naming nothing unpacked is left alone.
        let other = "include /usr/share/elsewhere.mk\nobj-m += x.o\n";
        assert_eq!(relocate_makefile(other, root), other);
        // Newer headers also name their output directory.
        let flavour = root.join("usr/src/linux-headers-7.3.4+deb13-cloud-amd64");
        std::fs::create_dir_all(&flavour).unwrap();
        let text = "KBUILD_OUTPUT=/usr/src/linux-headers-7.3.4+deb13-cloud-amd64\nx := a/usr/src\n";
        assert_eq!(
            relocate_makefile(text, root),
            format!(
                "KBUILD_OUTPUT={}/usr/src/linux-headers-7.3.4+deb13-cloud-amd64\nx := a/usr/src\n",
                root.display()
            )
        );
    }
}
