//! The initramfs images. A host image: our static init as `/init`, our binaries in `/bin`,
//! `dev/console`, the kernel modules the system needs (with their dependency closure and a
//! depmod-format `modules.dep`), the system's configuration and policy files, and the guest
//! images its VMs boot. A guest image: the small guest init as `/init`, the guest's
//! programs, its modules and `etc/bulkhead/guest.toml`. A guest that names Debian packages
//! also gets a root filesystem ([`crate::guest_root`]): an ext4 image the emulated host
//! receives as a read-only virtio disk with a serial, which the host image names
//! `/var/lib/bulkhead/guests/<guest>.root` (a link to `/dev/disk/by-id/virtio-<serial>`)
//! and its VMM gets as its first disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{Archive, ArchiveError};
use crate::kernel::plan::{KernelOverrides, KernelPlan, SystemKernels};
use crate::kernel::Kernel;
use crate::modules::{self, ModuleError, ModuleIndex};

/// The target our image binaries are built for (static, see `.cargo/config.toml`).
pub const IMAGE_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The cargo profile for image binaries.
pub const IMAGE_PROFILE: &str = "image";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    System { path: PathBuf, reason: String },
    #[error("building image binaries failed: {0}")]
    Cargo(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error(transparent)]
    Kmod(#[from] crate::kmod::KmodError),
    #[error(transparent)]
    Choice(#[from] crate::kernel::choice::ChoiceError),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    #[error(transparent)]
    Root(#[from] crate::guest_root::RootError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the image builder needs to know about a system directory
/// (`system.toml` + `policy.d/`), read without interpreting the rest: init owns the schema.
#[derive(Debug, Clone)]
pub struct SystemDir {
    pub dir: PathBuf,
    pub system_toml: String,
    /// Kernel modules the host loads at boot (`[host] modules`).
    pub modules: Vec<String>,
    /// Workspace binaries the services run from `/bin/` (besides init itself).
    pub binaries: Vec<String>,
    /// `policy.d/*` files: (name, contents).
    pub policy_files: Vec<(String, Vec<u8>)>,
    /// Guests (`guests/<name>/guest.toml`), each shipped as
    /// `/var/lib/bulkhead/guests/<name>.cpio.gz` next to the kernel at `GUEST_KERNEL`.
    pub guests: Vec<(String, GuestDir)>,
    /// `[kernel]`: the kernel the host boots (and guests that choose none).
    pub kernel: Option<bulkhead_init::config::KernelConfig>,
}

/// One guest of a system: `guests/<name>/guest.toml` (see `bulkhead_guest_init::config`).
#[derive(Debug, Clone)]
pub struct GuestDir {
    pub dir: PathBuf,
    pub guest_toml: String,
    /// Kernel modules the guest loads.
    pub modules: Vec<String>,
    /// Workspace binaries its programs run (besides the guest init).
    pub binaries: Vec<String>,
    /// `[kernel]`: the guest's own kernel choice, if not the host's.
    pub kernel: Option<bulkhead_init::config::KernelConfig>,
    /// Debian packages of its root filesystem (empty: none).
    pub packages: Vec<String>,
    /// `files/<path>` of the guest's directory, carried as `/etc/bulkhead/<path>`
    /// (configuration for its programs, e.g. a `weston.ini`): (path, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

/// Every regular file under `dir`, as (path relative to `dir`, contents), sorted.
fn read_tree(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let p = e.map_err(io(&d))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                let rel = p
                    .strip_prefix(dir)
                    .map(|r| r.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((rel, std::fs::read(&p).map_err(io(&p))?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The guest's PID 1.
pub const GUEST_INIT: &str = "bulkhead-guest-init";
/// The host's PID 1.
pub const HOST_INIT: &str = "bulkhead-init";
/// The operator's tool, in every host image.
pub const HOST_CTL: &str = "bulkhead-ctl";

impl GuestDir {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("guest.toml");
        let guest_toml = std::fs::read_to_string(&path).map_err(io(&path))?;
        // Validated with the guest init's own parser, as the host's system with init's.
        let config =
            bulkhead_guest_init::config::GuestConfig::parse(&guest_toml, &path).map_err(|e| {
                ImageError::System {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        Ok(GuestDir {
            dir: dir.to_path_buf(),
            modules: config.modules.clone(),
            binaries: config.binaries(),
            kernel: config.kernel.clone(),
            packages: config.packages.clone(),
            files: read_tree(&dir.join("files"))?,
            guest_toml,
        })
    }
}

/// Where a host image carries the kernel its VMs boot (unless a guest chooses another: see
/// [`crate::kernel::plan`]).
pub use crate::kernel::plan::GUEST_KERNEL;
/// Where a host image carries guest image `<name>`.
pub fn guest_image_path(name: &str) -> String {
    format!("var/lib/bulkhead/guests/{name}.cpio.gz")
}

/// Where a host image names the root disk of guest `<name>` (a guest with packages).
pub fn guest_root_path(name: &str) -> String {
    format!("var/lib/bulkhead/guests/{name}.root")
}

/// The virtio serial of the emulated host's disk that carries root image `img`.
pub fn root_disk_serial(img: &crate::guest_root::RootImage) -> String {
    format!("bh-{}", img.short_key())
}

/// Host modules a system needs when a guest has a root filesystem (the emulated host's
/// virtio disks).
pub const ROOT_DISK_HOST_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// Checks that every service booting a guest with packages gives it its root disk first
/// and read-only, and that the host loads what reaches its disks.
fn check_root_guests(
    config: &bulkhead_init::config::SystemConfig,
    guests: &[(String, GuestDir)],
) -> Result<(), String> {
    let with_root: Vec<&String> = guests
        .iter()
        .filter(|(_, g)| !g.packages.is_empty())
        .map(|(n, _)| n)
        .collect();
    if with_root.is_empty() {
        return Ok(());
    }
    for m in ROOT_DISK_HOST_MODULES {
        if !config.host.modules.iter().any(|h| h == m) {
            return Err(format!(
                "guest {} has a root filesystem: [host] modules must include {}",
                with_root[0],
                ROOT_DISK_HOST_MODULES.join(" and ")
            ));
        }
    }
    for svc in &config.service {
        for g in &with_root {
            let initramfs = format!("/{}", guest_image_path(g));
            if !svc.exec.contains(&initramfs) {
                continue;
            }
            let root = format!("/{}", guest_root_path(g));
            let first_disk = svc
                .exec
                .iter()
                .position(|a| a == "--disk")
                .and_then(|i| svc.exec.get(i + 1));
            if first_disk != Some(&root) || !svc.exec.iter().any(|a| a == "--disk-read-only") {
                return Err(format!(
                    "service {} boots guest {g}, which has a root filesystem: its exec must \
                     give \"--disk\", \"{root}\" as the first disk, and \"--disk-read-only\"",
                    svc.name
                ));
            }
        }
    }
    Ok(())
}

impl SystemDir {
    pub fn load(dir: &Path) -> Result<Self, ImageError> {
        let path = dir.join("system.toml");
        let system_toml = std::fs::read_to_string(&path).map_err(io(&path))?;
        // Validated with init's own parser: a system that init would reject fails here, at
        // build time, with the same message.
        let config =
            bulkhead_init::config::SystemConfig::parse(&system_toml, &path).map_err(|e| {
                ImageError::System {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let modules = config.host.modules.clone();
        let kernel = config.kernel.clone();
        // Every `/bin/<name>` the hub or a service runs (as the program or as an argument,
        // e.g. a wrapper) is one of our binaries.
        let mut binaries: Vec<String> = Vec::new();
        let hub_exec = config.hub.iter().flat_map(|h| h.exec.iter());
        // Also a command inside an argument (`--run-after NAME=/bin/policyctl apply`).
        for arg in hub_exec.chain(config.service.iter().flat_map(|s| s.exec.iter())) {
            let inner = arg
                .split_once("=/bin/")
                .and_then(|(_, rest)| rest.split_whitespace().next());
            for bin in arg.strip_prefix("/bin/").into_iter().chain(inner) {
                if bin != HOST_INIT && !binaries.iter().any(|b| b == bin) {
                    binaries.push(bin.to_string());
                }
            }
        }
        // Every host can be operated (`bulkhead-ctl ls`, `log`, `stop`, …).
        if !binaries.iter().any(|b| b == HOST_CTL) {
            binaries.push(HOST_CTL.to_string());
        }
        let mut policy_files = Vec::new();
        let pdir = dir.join("policy.d");
        if pdir.is_dir() {
            let mut names: Vec<PathBuf> = std::fs::read_dir(&pdir)
                .map_err(io(&pdir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            names.sort();
            for p in names {
                let data = std::fs::read(&p).map_err(io(&p))?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                policy_files.push((name, data));
            }
        }
        // Guests: `guests/<name>/guest.toml`, booted by bulkhead-vmm inside this host; each
        // image is built and shipped in ours.
        let mut guests = Vec::new();
        let gdir = dir.join("guests");
        if gdir.is_dir() {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&gdir)
                .map_err(io(&gdir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            dirs.sort();
            for d in dirs {
                if d.join("system.toml").is_file() && !d.join("guest.toml").is_file() {
                    return Err(ImageError::System {
                        path: d,
                        reason: "a guest is described by guest.toml (the guest init's), \
                                 not system.toml"
                            .into(),
                    });
                }
                let name = d
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                guests.push((name, GuestDir::load(&d)?));
            }
        }
        check_root_guests(&config, &guests).map_err(|reason| ImageError::System {
            path: path.clone(),
            reason,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            system_toml,
            modules,
            binaries,
            policy_files,
            guests,
            kernel,
        })
    }

    /// Which kernel the host and each guest boot, with the command line's `over`rides.
    pub fn kernel_plan(&self, over: &KernelOverrides) -> Result<KernelPlan, ImageError> {
        let guests: Vec<(String, Option<bulkhead_init::config::KernelConfig>)> = self
            .guests
            .iter()
            .map(|(n, g)| (n.clone(), g.kernel.clone()))
            .collect();
        Ok(KernelPlan::new(self.kernel.as_ref(), &guests, over)?)
    }

    /// Every workspace binary this system and its guests need, the inits first.
    pub fn all_binaries(&self) -> Vec<String> {
        let mut all = vec![HOST_INIT.to_string()];
        if !self.guests.is_empty() {
            all.push(GUEST_INIT.to_string());
        }
        for b in self
            .binaries
            .iter()
            .chain(self.guests.iter().flat_map(|(_, g)| g.binaries.iter()))
        {
            if !all.contains(b) {
                all.push(b.clone());
            }
        }
        all
    }
}

/// Where image binaries are built: a target directory of their own, so the static
/// RUSTFLAGS never invalidate ordinary builds and a build started from inside `cargo test`
/// does not wait on the outer cargo's lock.
pub fn image_target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target/image")
}

/// Builds the named workspace binaries statically and returns their paths.
pub fn build_binaries(
    workspace: &Path,
    bins: &[String],
) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let target_dir = image_target_dir(workspace);
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace)
        .args([
            "build",
            "--profile",
            IMAGE_PROFILE,
            "--target",
            IMAGE_TARGET,
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    for b in bins {
        cmd.args(["--bin", b]);
    }
    log::info!("building static binaries: {}", bins.join(" "));
    let status = cmd.status().map_err(|e| ImageError::Cargo(e.to_string()))?;
    if !status.success() {
        return Err(ImageError::Cargo(format!("cargo exited with {status}")));
    }
    let out = target_dir.join(IMAGE_TARGET).join(IMAGE_PROFILE);
    Ok(bins.iter().map(|b| (b.clone(), out.join(b))).collect())
}

/// Everything that goes into a host image.
#[derive(Debug, Clone)]
pub struct HostImage<'a> {
    /// The host's kernel and each guest's.
    pub kernels: &'a SystemKernels,
    pub system: &'a SystemDir,
    /// (name, path) of every binary; `bulkhead-init` becomes `/init`.
    pub binaries: Vec<(String, PathBuf)>,
    /// Extra files (image path, mode, contents), e.g. guest images for VMs.
    pub extra_files: Vec<(String, u32, Vec<u8>)>,
    /// The root images of the guests with packages: (guest, image).
    pub roots: Vec<(String, crate::guest_root::RootImage)>,
}

impl HostImage<'_> {
    /// Assembles the archive.
    pub fn archive(&self) -> Result<Archive, ImageError> {
        let mut a = Archive::new();
        base_tree(&mut a)?;
        for (name, path) in &self.binaries {
            if name == HOST_INIT {
                a.file_from("init", 0o755, path)?;
                a.symlink("bin/bulkhead-init", "/init")?;
            } else if self.system.binaries.contains(name) {
                a.file_from(&format!("bin/{name}"), 0o755, path)?;
            }
        }
        a.file(
            "etc/bulkhead/system.toml",
            0o644,
            self.system.system_toml.clone().into_bytes(),
        )?;
        a.dir("etc/bulkhead/policy.d", 0o755)?;
        for (name, data) in &self.system.policy_files {
            a.file(
                &format!("etc/bulkhead/policy.d/{name}"),
                0o644,
                data.clone(),
            )?;
        }
        add_modules(&mut a, &self.kernels.host, &self.system.modules)?;
        if !self.system.guests.is_empty() {
            let config = bulkhead_init::config::SystemConfig::parse(
                &self.system.system_toml,
                &self.system.dir.join("system.toml"),
            )
            .map_err(|e| ImageError::System {
                path: self.system.dir.clone(),
                reason: e.to_string(),
            })?;
            self.kernels
                .check_services(&config)
                .map_err(|reason| ImageError::System {
                    path: self.system.dir.join("system.toml"),
                    reason,
                })?;
            let names: Vec<&str> = self.system.guests.iter().map(|(n, _)| n.as_str()).collect();
            self.kernels.add_guest_kernels(&mut a, &names)?;
        }
        for (name, guest) in &self.system.guests {
            let kernel = self.kernels.guest(name);
            let img = guest_archive(kernel, guest, &self.binaries)?.write_gz(Vec::new())?;
            a.file(&guest_image_path(name), 0o644, img)?;
        }
        for (name, img) in &self.roots {
            a.symlink(
                &guest_root_path(name),
                &format!("/dev/disk/by-id/virtio-{}", root_disk_serial(img)),
            )?;
        }
        for (path, mode, data) in &self.extra_files {
            a.file(path, *mode, data.clone())?;
        }
        Ok(a)
    }

    /// The disks the emulated host needs besides its initramfs: one read-only virtio disk
    /// per distinct root image, with the serial its link names.
    pub fn disks(&self) -> Vec<crate::qemu::Disk> {
        let mut disks: Vec<crate::qemu::Disk> = Vec::new();
        for (_, img) in &self.roots {
            let serial = root_disk_serial(img);
            if !disks.iter().any(|d| d.serial == serial) {
                disks.push(crate::qemu::Disk {
                    path: img.path.clone(),
                    serial,
                    read_only: true,
                });
            }
        }
        disks
    }

    /// Writes the gzip'd newc image to `out`.
    pub fn write(&self, out: &Path) -> Result<(), ImageError> {
        let archive = self.archive()?;
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // A temporary name of this process's own, so concurrent builds never collide.
        let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let f = archive.write_gz(std::io::BufWriter::new(f))?;
        f.into_inner()
            .map_err(|e| ImageError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        Ok(())
    }
}

/// What every image has: the early mount points and the two device nodes a PID 1 needs
/// before devtmpfs is mounted.
fn base_tree(a: &mut Archive) -> Result<(), ImageError> {
    for d in ["proc", "sys", "dev", "run", "tmp", "mnt", "var/log"] {
        a.dir(d, 0o755)?;
    }
    a.dir("tmp", 0o1777)?;
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    Ok(())
}

/// The modules `wanted` (ours built against the kernel's headers) with their dependency
/// closure, `modules.dep`, `modules.softdep` and `modules.builtin`.
fn add_modules(a: &mut Archive, kernel: &Kernel, wanted: &[String]) -> Result<(), ImageError> {
    add_modules_and(a, kernel, wanted, &[])
}

/// As [`add_modules`], plus `if_present`: modules carried when the kernel has them.
fn add_modules_and(
    a: &mut Archive,
    kernel: &Kernel,
    wanted: &[String],
    if_present: &[&str],
) -> Result<(), ImageError> {
    let mut index = ModuleIndex::scan(&kernel.modules_dir)?;
    let mut wanted = wanted.to_vec();
    for m in if_present {
        if index.rel_path(m).is_some() && !wanted.iter().any(|w| w == m) {
            wanted.push(m.to_string());
        }
    }
    let wanted = &wanted[..];
    let workspace = crate::workspace_dir();
    for m in wanted {
        if crate::kmod::source_dir(&workspace, m).is_some() {
            let ko = crate::kmod::build(&workspace, m, kernel)?;
            index.add_external(m, ko);
        }
    }
    let chosen = index.closure(wanted)?;
    let base = format!("lib/modules/{}", kernel.abi);
    for m in &chosen {
        // Decompressed if the kernel ships it compressed (`rel_path` is the `.ko`).
        let data = modules::read_module(&m.source)?;
        a.file(&format!("{base}/{}", m.rel_path), 0o644, data)?;
    }
    a.file(
        &format!("{base}/modules.dep"),
        0o644,
        modules::modules_dep(&chosen).into_bytes(),
    )?;
    a.file(
        &format!("{base}/modules.softdep"),
        0o644,
        modules::modules_softdep(&chosen).into_bytes(),
    )?;
    let builtin = kernel.modules_dir.join("modules.builtin");
    if builtin.exists() {
        a.file_from(&format!("{base}/modules.builtin"), 0o644, &builtin)?;
    }
    Ok(())
}

/// A guest's image: the guest init as `/init`, the guest's binaries, its modules and
/// `etc/bulkhead/guest.toml`. `binaries` are (name, path) of the built binaries.
pub fn guest_archive(
    kernel: &Kernel,
    guest: &GuestDir,
    binaries: &[(String, PathBuf)],
) -> Result<Archive, ImageError> {
    let mut a = Archive::new();
    base_tree(&mut a)?;
    let mut have_init = false;
    for (name, path) in binaries {
        if name == GUEST_INIT {
            a.file_from("init", 0o755, path)?;
            have_init = true;
        } else if guest.binaries.contains(name) {
            a.file_from(&format!("bin/{name}"), 0o755, path)?;
        }
    }
    if !have_init {
        return Err(ImageError::System {
            path: guest.dir.clone(),
            reason: format!("{GUEST_INIT} was not built"),
        });
    }
    a.file(
        bulkhead_guest_init::config::CONFIG_PATH.trim_start_matches('/'),
        0o644,
        guest.guest_toml.clone().into_bytes(),
    )?;
    for (rel, data) in &guest.files {
        a.file(&format!("etc/bulkhead/{rel}"), 0o644, data.clone())?;
    }
    let mut modules = guest.modules.clone();
    if !guest.packages.is_empty() {
        for m in bulkhead_guest_init::config::ROOT_MODULES {
            if !modules.iter().any(|x| x == m) {
                modules.push(m.to_string());
            }
        }
    }
    add_modules_and(
        &mut a,
        kernel,
        &modules,
        bulkhead_guest_init::config::POWER_BUTTON_MODULES,
    )?;
    Ok(a)
}

/// The root images of a system's guests with packages, built or taken from the cache in
/// `cache_dir`: (guest, image).
pub fn guest_roots(
    sys: &SystemDir,
    cache_dir: &Path,
) -> Result<Vec<(String, crate::guest_root::RootImage)>, ImageError> {
    let mut roots = Vec::new();
    for (name, g) in &sys.guests {
        if !g.packages.is_empty() {
            roots.push((
                name.clone(),
                crate::guest_root::image_for(cache_dir, &g.packages)?,
            ));
        }
    }
    Ok(roots)
}

/// Builds the host image for a system directory with `kernels` (see
/// [`SystemDir::kernel_plan`]): its binaries (static), its modules, its guests (and their
/// root filesystems, in `cache_dir`); writes it to `out` and returns the disks the emulated
/// host must be given besides it (see [`HostImage::disks`]).
pub fn build_system_image(
    kernels: &SystemKernels,
    cache_dir: &Path,
    workspace: &Path,
    system: &Path,
    out: &Path,
) -> Result<Vec<crate::qemu::Disk>, ImageError> {
    let sys = SystemDir::load(system)?;
    let roots = guest_roots(&sys, cache_dir)?;
    let binaries = build_binaries(workspace, &sys.all_binaries())?;
    let host = HostImage {
        kernels,
        system: &sys,
        binaries,
        extra_files: Vec::new(),
        roots,
    };
    host.write(out)?;
    Ok(host.disks())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every system in the repository (the example, the test and the bench systems) passes init's and
    /// the guest init's parsers, so no boot is spent on a configuration mistake.
    #[test]
    fn every_system_in_the_repository_loads() {
        let ws = crate::workspace_dir();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for parent in ["tests/systems", "rootfs/examples", "rootfs/bench"] {
            for e in std::fs::read_dir(ws.join(parent)).unwrap() {
                dirs.push(e.unwrap().path());
            }
        }
        assert!(dirs.len() >= 10, "{dirs:?}");
        let mut guests = 0;
        for d in dirs {
            let sys = SystemDir::load(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
            for (name, g) in &sys.guests {
                assert!(!name.is_empty());
                // (A guest may load no module: the display test's drives its device
                // from user space.)
                assert!(
                    g.modules.iter().all(|m| !m.is_empty()),
                    "{}",
                    g.dir.display()
                );
                guests += 1;
            }
            let all = sys.all_binaries();
            assert_eq!(all.first().map(String::as_str), Some(HOST_INIT));
            assert_eq!(
                all.contains(&GUEST_INIT.to_string()),
                !sys.guests.is_empty()
            );
        }
        assert!(guests >= 8, "only {guests} guests");
        // A command named inside an argument (`--run-after NAME=/bin/policyctl …`) ships too.
        let wayland = SystemDir::load(&ws.join("tests/systems/wayland")).unwrap();
        assert!(
            wayland.binaries.iter().any(|b| b == "policyctl"),
            "{:?}",
            wayland.binaries
        );
    }

    #[test]
    fn a_guest_in_the_host_format_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("system.toml"),
            "[host]\nwhen_idle = \"poweroff\"\n",
        )
        .unwrap();
        let g = dir.path().join("guests/old");
        std::fs::create_dir_all(&g).unwrap();
        std::fs::write(g.join("system.toml"), "[host]\nmodules = []\n").unwrap();
        let e = SystemDir::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a guest is described by guest.toml"), "{e}");
        std::fs::write(g.join("guest.toml"), "[[program]]\nname = \"x\"\n").unwrap();
        let e = SystemDir::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("guest.toml") && e.contains("missing field"),
            "{e}"
        );
    }
}
