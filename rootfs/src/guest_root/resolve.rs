//! Which Debian packages a guest's root filesystem holds: the closure of the packages it
//! names, as apt's own resolver computes it for a machine that has nothing installed
//! (`apt-get --simulate` with an empty dpkg status file, without recommends). Alternatives
//! and virtual packages are resolved the way apt would resolve them on a real install.

use std::path::Path;
use std::process::Command;

use super::RootError;

/// One package of the closure, at the version apt chose.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pinned {
    pub name: String,
    pub version: String,
}

impl Pinned {
    /// `name=version`, as `apt-get download` takes it.
    pub fn spec(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

pub use bulkhead_guest_init::config::valid_package_name;

/// Parses `apt-get -s install` output: one `Inst NAME (VERSION RELEASE [ARCH])` line per
/// package apt would unpack, in apt's order. Other lines (`Conf`, notes) are ignored.
pub fn parse_simulation(out: &str) -> Vec<Pinned> {
    let mut v: Vec<Pinned> = out
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(' ')?;
            // A package that replaces an installed one reads `Inst p [old] (new …)`; with an
            // empty status there is none, but the form is cheap to accept.
            let rest = match rest.strip_prefix('[') {
                Some(r) => r.split_once("] ")?.1,
                None => rest,
            };
            let version = rest.strip_prefix('(')?.split_whitespace().next()?;
            (valid_package_name(name) && !version.is_empty()).then(|| Pinned {
                name: name.to_string(),
                version: version.to_string(),
            })
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The closure of `packages` (each already checked with [`valid_package_name`]), resolved
/// by apt with an empty status file at `empty_status`.
pub fn closure(packages: &[String], empty_status: &Path) -> Result<Vec<Pinned>, RootError> {
    if let Some(bad) = packages.iter().find(|p| !valid_package_name(p)) {
        return Err(RootError::BadName(bad.clone()));
    }
    if let Some(parent) = empty_status.parent() {
        std::fs::create_dir_all(parent).map_err(RootError::io(parent))?;
    }
    std::fs::write(empty_status, b"").map_err(RootError::io(empty_status))?;
    let mut cmd = Command::new("apt-get");
    cmd.args(["-s", "-q", "-o"])
        .arg(format!("Dir::State::status={}", empty_status.display()))
        .args([
            "-o",
            "APT::Install-Recommends=false",
            "-o",
            "APT::Install-Suggests=false",
            "install",
        ])
        .args(packages)
        .env("LC_ALL", "C");
    let out = super::run(&mut cmd)?;
    let pinned = parse_simulation(&out);
    if pinned.is_empty() {
        return Err(RootError::Command {
            command: "apt-get -s install".into(),
            detail: format!("apt would install nothing for {packages:?}"),
        });
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_simulation_lines_give_the_closure() {
        let out = "Reading package lists...\n\
            Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
            Conf gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])\n\
            Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []\n\
            Inst fonts-dejavu-core (2.37-6 Debian:12.15/oldstable [all])\n\
            Inst weird [1.0] (2.0 Debian:12 [amd64])\n\
            Inst Bad;Name (1 x [amd64])\n";
        let got = parse_simulation(out);
        let names: Vec<String> = got.iter().map(|p| p.spec()).collect();
        assert_eq!(
            names,
            [
                "fonts-dejavu-core=2.37-6",
                "gcc-12-base=12.2.0-14+deb12u1",
                "libc6=2.36-9+deb12u14",
                "weird=2.0",
            ]
        );
    }
}
