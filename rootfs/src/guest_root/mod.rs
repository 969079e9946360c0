//! Root filesystems for guests that name Debian packages (`packages = [...]` in
//! guest.toml): apt resolves the closure ([`resolve`]), the `.deb`s are downloaded from
//! Debian's archive into a shared cache, unpacked into a tree ([`tree`]) and packed into an
//! ext4 image ([`ext4`]). Images live in `<cache>/guest-roots/<key>/root.ext4`, where the
//! key hashes the requested names and the exact versions apt chose: an image is built once
//! and rebuilt only when the list (or a package's version) changes. Guests that name the
//! same packages share one image. The VM gets it as a read-only virtio-blk disk; see
//! `docs/wayland.md`.

pub mod ext4;
pub mod resolve;
pub mod tree;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

pub use resolve::{valid_package_name, Pinned};

/// Bumped when the way images are made changes (so old cached images are not reused).
const FORMAT: &str = "bulkhead-guest-root 1";

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{0:?} is not a Debian package name")]
    BadName(String),
    #[error("a guest's root filesystem: {0}")]
    Tree(String),
}

impl RootError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootError + '_ {
        move |source| RootError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Runs `cmd`, returning its stdout; a failure carries its stderr (`apt::run`'s, with
/// this module's error).
fn run(cmd: &mut Command) -> Result<String, RootError> {
    crate::apt::run(cmd).map_err(|e| match e {
        crate::apt::AptError::Command { command, detail } => RootError::Command { command, detail },
        other => RootError::Command {
            command: String::new(),
            detail: other.to_string(),
        },
    })
}

/// A built root image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    /// The ext4 image.
    pub path: PathBuf,
    /// Its cache key (hex): the same for the same packages at the same versions.
    pub key: String,
    /// The packages it was asked for, sorted.
    pub requested: Vec<String>,
    /// Every package in it.
    pub closure: Vec<Pinned>,
}

impl RootImage {
    /// A short stable name for the image (the first 12 hex digits of its key).
    pub fn short_key(&self) -> &str {
        self.key.get(..12).unwrap_or(&self.key)
    }
}

/// The cache key of an image: the format, the requested names and the closure.
pub fn cache_key(requested: &[String], closure: &[Pinned]) -> String {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(b"\nrequested\n");
    for r in requested {
        h.update(r.as_bytes());
        h.update(b"\n");
    }
    h.update(b"closure\n");
    for p in closure {
        h.update(p.spec().as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The file name apt-get download gives `p` (`name_version_arch.deb`, `:` as `%3a`),
/// without its arch part.
fn deb_prefix(p: &Pinned) -> String {
    format!("{}_{}_", p.name, p.version.replace(':', "%3a"))
}

/// Downloads what of `closure` is not in `dir` yet; returns every package's `.deb`.
fn fetch(closure: &[Pinned], dir: &Path) -> Result<Vec<PathBuf>, RootError> {
    std::fs::create_dir_all(dir).map_err(RootError::io(dir))?;
    let find = |p: &Pinned| -> Result<Option<PathBuf>, RootError> {
        let prefix = deb_prefix(p);
        for e in std::fs::read_dir(dir).map_err(RootError::io(dir))? {
            let path = e.map_err(RootError::io(dir))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")) {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    let mut missing = Vec::new();
    for p in closure {
        if find(p)?.is_none() {
            missing.push(p.spec());
        }
    }
    if !missing.is_empty() {
        log::info!(
            "downloading {} Debian packages into {}",
            missing.len(),
            dir.display()
        );
        run(Command::new("apt-get")
            .current_dir(dir)
            // apt's download sandbox user cannot write into root's cache.
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(&missing))?;
    }
    closure
        .iter()
        .map(|p| {
            find(p)?.ok_or_else(|| RootError::Command {
                command: format!("apt-get download {}", p.spec()),
                detail: "no .deb appeared".into(),
            })
        })
        .collect()
}

/// Where images are cached under `cache_dir`.
pub fn roots_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("guest-roots")
}

/// The image for `packages`: from the cache when it is there, built otherwise. Builds from
/// several processes wait for each other (a lock file in the cache).
pub fn image_for(cache_dir: &Path, packages: &[String]) -> Result<RootImage, RootError> {
    let mut requested: Vec<String> = packages.to_vec();
    requested.sort();
    requested.dedup();
    if requested.is_empty() {
        return Err(RootError::Tree("no packages named".into()));
    }
    let base = roots_dir(cache_dir);
    std::fs::create_dir_all(&base).map_err(RootError::io(&base))?;
    let lock_path = base.join(".lock");
    let lock_file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(RootError::io(&lock_path))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| RootError::io(&lock_path)(e.into()))?;
    let closure = resolve::closure(&requested, &base.join("empty-status"))?;
    let key = cache_key(&requested, &closure);
    let dir = base.join(&key[..16]);
    let image = RootImage {
        path: dir.join("root.ext4"),
        key: key.clone(),
        requested: requested.clone(),
        closure: closure.clone(),
    };
    if dir.join(".complete").exists() && image.path.exists() {
        log::info!(
            "guest root for {} in {}",
            requested.join(" "),
            image.path.display()
        );
        return Ok(image);
    }
    log::info!(
        "building a guest root for {} ({} packages)",
        requested.join(" "),
        closure.len()
    );
    let debs = fetch(&closure, &base.join("debs"))?;
    let work = base.join(format!("{}.tmp.{}", &key[..16], std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let tree_dir = work.join("tree");
    tree::unpack(&debs, &tree_dir)?;
    tree::merge_usr(&tree_dir)?;
    tree::prune(&tree_dir)?;
    tree::skeleton(&tree_dir)?;
    ext4::pack(&tree_dir, &work.join("root.ext4"))?;
    std::fs::remove_dir_all(&tree_dir).map_err(RootError::io(&tree_dir))?;
    let manifest: String = closure.iter().map(|p| p.spec() + "\n").collect();
    let written = work.join("closure.txt");
    std::fs::write(&written, manifest).map_err(RootError::io(&written))?;
    let req = work.join("requested.txt");
    std::fs::write(&req, requested.join("\n") + "\n").map_err(RootError::io(&req))?;
    let done = work.join(".complete");
    std::fs::write(&done, key.as_bytes()).map_err(RootError::io(&done))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&work, &dir).map_err(RootError::io(&dir))?;
    let size = std::fs::metadata(&image.path).map(|m| m.len()).unwrap_or(0);
    log::info!("guest root {} ({} MiB)", image.path.display(), size >> 20);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(n: &str, v: &str) -> Pinned {
        Pinned {
            name: n.into(),
            version: v.into(),
        }
    }

    #[test]
    fn the_key_changes_with_the_list_and_the_versions_only() {
        let req = vec!["weston".to_string()];
        let a = cache_key(&req, &[pin("libc6", "2.36-9"), pin("weston", "10.0.1-1")]);
        let same = cache_key(&req, &[pin("libc6", "2.36-9"), pin("weston", "10.0.1-1")]);
        let newer = cache_key(&req, &[pin("libc6", "2.36-10"), pin("weston", "10.0.1-1")]);
        let more = cache_key(
            &["weston".to_string(), "dash".to_string()],
            &[pin("libc6", "2.36-9"), pin("weston", "10.0.1-1")],
        );
        assert_eq!(a, same);
        assert_ne!(a, newer);
        assert_ne!(a, more);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn deb_file_names_escape_epochs() {
        assert_eq!(deb_prefix(&pin("libx", "1:2.0-1")), "libx_1%3a2.0-1_");
    }
}
