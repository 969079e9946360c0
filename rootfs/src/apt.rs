//! Debian packages through apt's own tools, for the build machine's suite or for another one.
//!
//! A kernel from a suite the build machine's apt sources do not name (Debian 12's
//! `bookworm-backports`, `stable`, …) is looked up and downloaded with a private apt
//! configuration under the cache (`apt/<suite>/`: its own sources.list naming only that
//! suite on the machine's own Debian mirror, its own package lists and apt cache), so the
//! machine's apt configuration is never changed and nothing from that suite is ever
//! installed on it: `apt-get download` and `dpkg-deb -x` only.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kernel::{Cache, Suite};

/// Debian's archive keyring (debian-archive-keyring), which also signs newer releases.
pub const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot tell the build machine's Debian release (no VERSION_CODENAME in /etc/os-release), so \"backports\" means nothing: name the suite, e.g. \"bookworm-backports\"")]
    NoCodename,
    #[error("the build machine's apt sources name no Debian archive (Origin and Label \"Debian\", component main) to fetch {suite} from; run `apt-get update` as root first")]
    NoMirror { suite: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs a command; its standard output, or an error with its standard error.
pub(crate) fn run(cmd: &mut Command) -> Result<String, AptError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| AptError::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(AptError::Command {
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AptError + '_ {
    move |source| AptError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `VERSION_CODENAME` of an os-release file.
pub fn parse_codename(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        let v = l.trim().strip_prefix("VERSION_CODENAME=")?;
        let v = v.trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty() && bulkhead_init::config::valid_suite_name(v)).then(|| v.to_string())
    })
}

/// The build machine's Debian codename (`bookworm`, `trixie`).
pub fn codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .ok()?;
    parse_codename(&text)
}

/// The format asked of `apt-get indextargets` (tab-separated).
const INDEXTARGETS_FORMAT: &str =
    "$(TARGET_OF)\t$(REPO_URI)\t$(RELEASE)\t$(COMPONENT)\t$(ORIGIN)\t$(LABEL)\t$(IDENTIFIER)";

/// The URI of Debian's main archive among the machine's apt index targets (as printed with
/// [`INDEXTARGETS_FORMAT`]), preferring the entry of the machine's own release.
pub fn debian_mirror(indextargets: &str, codename: Option<&str>) -> Option<String> {
    let debian: Vec<(&str, &str)> = indextargets
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            match f.as_slice() {
                ["deb", uri, release, "main", "Debian", "Debian", "Packages"]
                    if uri.contains("://") =>
                {
                    Some((*uri, *release))
                }
                _ => None,
            }
        })
        .collect();
    debian
        .iter()
        .find(|(_, r)| Some(*r) == codename)
        .or_else(|| debian.first())
        .map(|(uri, _)| uri.to_string())
}

/// The one line of a private sources.list.
pub fn sources_line(mirror: &str, suite: &str, keyring: Option<&str>) -> String {
    match keyring {
        Some(k) => format!("deb [signed-by={k}] {mirror} {suite} main\n"),
        None => format!("deb {mirror} {suite} main\n"),
    }
}

/// apt, either as the build machine has it configured or with a private configuration for
/// one suite.
#[derive(Debug, Clone)]
pub struct Apt {
    /// The private state directory; `None`: the machine's own configuration.
    private: Option<PathBuf>,
    /// The suite's name as apt knows it (`bookworm-backports`), or `system`.
    suite: String,
}

impl Apt {
    /// The build machine's own apt configuration.
    pub fn system() -> Self {
        Self {
            private: None,
            suite: "system".into(),
        }
    }

    /// apt for `suite`: the machine's own configuration for [`Suite::System`], else a private
    /// one under the cache (written, or rewritten when the machine's mirror changed).
    pub fn for_suite(cache: &Cache, suite: &Suite) -> Result<Self, AptError> {
        let name = match suite {
            Suite::System => return Ok(Self::system()),
            Suite::Backports => format!("{}-backports", codename().ok_or(AptError::NoCodename)?),
            Suite::Named(s) => s.clone(),
        };
        let dir = cache.apt_dir(&name);
        let find_mirror = || -> Result<Option<String>, AptError> {
            let targets = run(Command::new("apt-get")
                .arg("indextargets")
                .arg("--format")
                .arg(INDEXTARGETS_FORMAT))?;
            Ok(debian_mirror(&targets, codename().as_deref()))
        };
        // The archive's Origin and Label come from its Release file: a machine whose lists
        // were never fetched shows none yet.
        let no_mirror = || AptError::NoMirror {
            suite: name.clone(),
        };
        let mirror = match find_mirror()? {
            Some(m) => m,
            None if is_root() => {
                Apt::system().update()?;
                find_mirror()?.ok_or_else(no_mirror)?
            }
            None => return Err(no_mirror()),
        };
        let keyring = Path::new(DEBIAN_KEYRING).exists().then_some(DEBIAN_KEYRING);
        let line = sources_line(&mirror, &name, keyring);
        for d in [
            "lists/partial",
            "cache/archives/partial",
            "sources.list.d",
            "preferences.d",
        ] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let list = dir.join("sources.list");
        if std::fs::read_to_string(&list).ok().as_deref() != Some(line.as_str()) {
            std::fs::write(&list, &line).map_err(io(&list))?;
            // Lists fetched from another mirror are stale now.
            let _ = std::fs::remove_dir_all(dir.join("lists"));
            let p = dir.join("lists/partial");
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Self {
            private: Some(dir),
            suite: name,
        })
    }

    /// What this apt fetches from, for messages.
    pub fn describe(&self) -> String {
        match &self.private {
            None => "the build machine's apt sources".into(),
            Some(d) => format!(
                "{}, private apt configuration in {}",
                self.suite,
                d.display()
            ),
        }
    }

    /// Is this the machine's own configuration?
    pub fn is_system(&self) -> bool {
        self.private.is_none()
    }

    /// The `-o` options of the private configuration.
    fn options(&self) -> Vec<String> {
        let Some(d) = &self.private else {
            return Vec::new();
        };
        let p = |rel: &str| d.join(rel).display().to_string();
        let mut o = vec![
            format!("Dir::Etc::SourceList={}", p("sources.list")),
            format!("Dir::Etc::SourceParts={}", p("sources.list.d")),
            format!("Dir::Etc::Preferences={}", p("preferences")),
            format!("Dir::Etc::PreferencesParts={}", p("preferences.d")),
            format!("Dir::State::Lists={}", p("lists")),
            format!("Dir::Cache={}", p("cache")),
        ];
        if is_root() {
            // apt's download sandbox user cannot write into root's cache.
            o.push("APT::Sandbox::User=root".into());
        }
        o.into_iter().flat_map(|v| ["-o".to_string(), v]).collect()
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .args(self.options());
        c
    }

    /// Fetches the package lists (`apt-get update`; the machine's own needs root).
    pub fn update(&self) -> Result<(), AptError> {
        run(self.command("apt-get").args(["update", "-q"])).map(|_| ())
    }

    /// Has this apt any package lists yet?
    pub fn has_lists(&self) -> bool {
        let dir = match &self.private {
            Some(d) => d.join("lists"),
            None => PathBuf::from("/var/lib/apt/lists"),
        };
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false)
    }

    /// `apt-cache depends PKG` (no recommends or suggests).
    pub fn depends(&self, pkg: &str) -> Result<String, AptError> {
        run(self
            .command("apt-cache")
            .args(["depends", "--no-recommends", "--no-suggests", pkg]))
    }

    /// Downloads the packages' .deb files into `dir` and returns their paths, in order.
    pub fn download(&self, pkgs: &[String], dir: &Path) -> Result<Vec<PathBuf>, AptError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut cmd = self.command("apt-get");
        cmd.current_dir(dir).args(["-q", "download"]).args(pkgs);
        if self.private.is_none() && is_root() {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        run(&mut cmd)?;
        let files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        pkgs.iter()
            .map(|pkg| {
                files
                    .iter()
                    .find(|p| {
                        p.file_name()
                            .map(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                            .unwrap_or(false)
                    })
                    .cloned()
                    .ok_or_else(|| AptError::Command {
                        command: format!("apt-get download {pkg}"),
                        detail: "no .deb appeared".into(),
                    })
            })
            .collect()
    }
}

/// What `apt-cache depends` says a package depends on: (first alternative of each
/// dependency, without virtual `<names>`).
pub fn parse_depends(apt_cache_depends: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_alternatives = false;
    for l in apt_cache_depends.lines() {
        let t = l.trim();
        let (alt, rest) = if let Some(r) = t.strip_prefix("|Depends:") {
            (true, r)
        } else if let Some(r) = t.strip_prefix("Depends:") {
            (false, r)
        } else {
            continue;
        };
        let name = rest.trim();
        // Only the first alternative of an `a | b | c` group counts.
        if !in_alternatives && !name.starts_with('<') && !name.is_empty() {
            out.push(name.to_string());
        }
        in_alternatives = alt;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codename_comes_from_os_release() {
        let deb12 = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(parse_codename(deb12).as_deref(), Some("bookworm"));
        assert_eq!(
            parse_codename("VERSION_CODENAME=\"trixie\"\n").as_deref(),
            Some("trixie")
        );
        assert_eq!(parse_codename("ID=debian\n"), None);
        assert_eq!(parse_codename("VERSION_CODENAME=a b;rm\n"), None);
    }

    #[test]
    fn the_mirror_is_debians_main_archive_of_this_release() {
        let targets = "deb\thttp://mirror.example/debian-security/\tbookworm-security\tmain\tDebian\tDebian-Security\tPackages\n\
                       deb\thttp://mirror.example/debian/\tbookworm\tmain\tDebian\tDebian\tDEP-11\n\
                       deb\thttp://other.example/debian/\tbookworm-updates\tmain\tDebian\tDebian\tPackages\n\
                       deb\thttp://mirror.example/debian/\tbookworm\tmain\tDebian\tDebian\tPackages\n\
                       deb\thttps://vendor.example/apt\tnodistro\tmain\tVendor\tVendor\tPackages\n";
        assert_eq!(
            debian_mirror(targets, Some("bookworm")).as_deref(),
            Some("http://mirror.example/debian/")
        );
        // Without the release's own entry, any Debian main archive.
        assert_eq!(
            debian_mirror(targets, Some("trixie")).as_deref(),
            Some("http://other.example/debian/")
        );
        assert_eq!(
            debian_mirror(
                "deb\thttps://vendor.example/apt\tx\tmain\tVendor\tVendor\tPackages\n",
                None
            ),
            None
        );
        assert_eq!(
            sources_line("http://mirror.example/debian/", "bookworm-backports", Some(DEBIAN_KEYRING)),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian/ bookworm-backports main\n"
        );
    }

    #[test]
    fn depends_take_the_first_alternative_and_skip_virtual_packages() {
        let out = "linux-headers-6.12.95+deb12-cloud-amd64\n  Depends: linux-base\n  Depends: linux-headers-6.12.95+deb12-common\n |Depends: linux-image-6.12.95+deb12-cloud-amd64\n  Depends: linux-image-6.12.95+deb12-cloud-amd64-unsigned\n  Depends: linux-kbuild-6.12.95+deb12\n  Depends: gcc-12\n  Depends: <libc-dev>\n";
        assert_eq!(
            parse_depends(out),
            [
                "linux-base",
                "linux-headers-6.12.95+deb12-common",
                "linux-image-6.12.95+deb12-cloud-amd64",
                "linux-kbuild-6.12.95+deb12",
                "gcc-12"
            ]
        );
    }
}
