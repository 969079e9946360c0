//! Which kernel each part of a system boots.
//!
//! The host boots the choice of its system.toml's `[kernel]` (default: the cloud kernel of
//! the build machine's own suite), or what the command line says instead. Guests boot the
//! host's kernel unless their guest.toml's `[kernel]` says otherwise; the command line's
//! guest options override both. A host image carries the guests' default kernel as
//! `/var/lib/bulkhead/vmlinuz`, every other guest kernel once as
//! `/var/lib/bulkhead/kernels/<abi>.vmlinuz`, and for each guest `<name>` a link
//! `/var/lib/bulkhead/guests/<name>.vmlinuz` to the kernel it boots; each guest image
//! carries modules built for its own kernel.

use std::collections::BTreeMap;

use bulkhead_init::config::{KernelConfig, SystemConfig};

use super::{Cache, ChoiceOverride, Kernel, KernelChoice, KernelError};
use crate::cpio::{Archive, ArchiveError};
use crate::kernel::choice::ChoiceError;

/// Where a host image carries the guests' default kernel.
pub const GUEST_KERNEL: &str = "var/lib/bulkhead/vmlinuz";

/// Where a host image carries a guest kernel that is not the default.
pub fn other_kernel_path(abi: &str) -> String {
    format!("var/lib/bulkhead/kernels/{abi}.vmlinuz")
}

/// Where a host image links guest `name`'s kernel.
pub fn guest_kernel_link(name: &str) -> String {
    format!("var/lib/bulkhead/guests/{name}.vmlinuz")
}

/// Command-line overrides of the files' choices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelOverrides {
    /// For the host (and so for guests that choose nothing).
    pub host: ChoiceOverride,
    /// For every guest, over its own choice.
    pub guests: ChoiceOverride,
}

impl KernelOverrides {
    pub fn is_empty(&self) -> bool {
        self.host.is_empty() && self.guests.is_empty()
    }

    /// A short name for build directories: empty when nothing is overridden.
    pub fn tag(&self) -> String {
        let part = |o: &ChoiceOverride| {
            let mut s = String::new();
            if let Some(f) = o.flavour {
                s.push_str(super::choice::flavour_name(f));
            }
            if let Some(su) = &o.suite {
                if !s.is_empty() {
                    s.push('-');
                }
                s.push_str(su.name());
            }
            s
        };
        match (part(&self.host), part(&self.guests)) {
            (h, g) if h.is_empty() && g.is_empty() => String::new(),
            (h, g) if g.is_empty() => format!("host-{h}"),
            (h, g) if h.is_empty() => format!("guests-{g}"),
            (h, g) => format!("host-{h}-guests-{g}"),
        }
    }
}

/// The choice for each part of a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPlan {
    pub host: KernelChoice,
    /// The kernel at [`GUEST_KERNEL`].
    pub guest_default: KernelChoice,
    /// Each guest's, by name.
    pub guests: BTreeMap<String, KernelChoice>,
}

impl KernelPlan {
    /// The plan for a system whose system.toml says `system` and whose guests say `guests`.
    pub fn new(
        system: Option<&KernelConfig>,
        guests: &[(String, Option<KernelConfig>)],
        over: &KernelOverrides,
    ) -> Result<Self, ChoiceError> {
        let from = |k: Option<&KernelConfig>| {
            k.map(ChoiceOverride::from_config)
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let host = KernelChoice::default()
            .with(&from(system)?)
            .with(&over.host);
        let guest_default = host.with(&over.guests);
        let mut plan = BTreeMap::new();
        for (name, k) in guests {
            let c = guest_default.with(&from(k.as_ref())?).with(&over.guests);
            plan.insert(name.clone(), c);
        }
        Ok(Self {
            host,
            guest_default,
            guests: plan,
        })
    }

    /// Every distinct kernel the plan needs, the host's first.
    pub fn choices(&self) -> Vec<KernelChoice> {
        let mut out = vec![self.host.clone()];
        let guests = std::iter::once(&self.guest_default).chain(self.guests.values());
        for c in guests {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    /// The provisioned kernels of the plan.
    pub fn resolve(&self, cache: &Cache) -> Result<SystemKernels, KernelError> {
        let mut guests = BTreeMap::new();
        for (name, c) in &self.guests {
            guests.insert(name.clone(), Kernel::chosen(cache, c)?);
        }
        Ok(SystemKernels {
            host: Kernel::chosen(cache, &self.host)?,
            guest_default: Kernel::chosen(cache, &self.guest_default)?,
            guests,
        })
    }
}

/// The kernels a system's images are built with.
#[derive(Debug, Clone)]
pub struct SystemKernels {
    pub host: Kernel,
    /// The kernel at [`GUEST_KERNEL`].
    pub guest_default: Kernel,
    /// Each guest's, by name (a guest not named boots the default).
    pub guests: BTreeMap<String, Kernel>,
}

impl SystemKernels {
    /// One kernel for everything.
    pub fn all(kernel: Kernel) -> Self {
        Self {
            guest_default: kernel.clone(),
            host: kernel,
            guests: BTreeMap::new(),
        }
    }

    /// The kernel guest `name` boots.
    pub fn guest(&self, name: &str) -> &Kernel {
        self.guests.get(name).unwrap_or(&self.guest_default)
    }

    /// Puts the guests' kernels into a host image: the default at [`GUEST_KERNEL`], each
    /// other one once at [`other_kernel_path`], and a link per guest at
    /// [`guest_kernel_link`].
    pub fn add_guest_kernels(&self, a: &mut Archive, guests: &[&str]) -> Result<(), ArchiveError> {
        let default = &self.guest_default;
        a.file_from(GUEST_KERNEL, 0o644, &default.vmlinuz)?;
        let mut others: Vec<&str> = Vec::new();
        for name in guests {
            let k = self.guest(name);
            let target = if k.abi == default.abi {
                "../vmlinuz".to_string()
            } else {
                if !others.contains(&k.abi.as_str()) {
                    a.file_from(&other_kernel_path(&k.abi), 0o644, &k.vmlinuz)?;
                    others.push(&k.abi);
                }
                format!("../kernels/{}.vmlinuz", k.abi)
            };
            a.symlink(&guest_kernel_link(name), &target)?;
        }
        Ok(())
    }

    /// Checks that every service booting one of the system's guest images passes it the
    /// kernel that image's modules were built for.
    pub fn check_services(&self, config: &SystemConfig) -> Result<(), String> {
        let guest_of_image = |p: &str| {
            p.strip_prefix("/var/lib/bulkhead/guests/")
                .and_then(|f| f.strip_suffix(".cpio.gz"))
                .map(str::to_string)
        };
        for s in &config.service {
            let arg = |flag: &str| {
                s.exec
                    .iter()
                    .position(|a| a == flag)
                    .and_then(|i| s.exec.get(i + 1))
            };
            let (Some(image), Some(kernel)) = (arg("--initramfs"), arg("--kernel")) else {
                continue;
            };
            let Some(guest) = guest_of_image(image) else {
                continue;
            };
            let wants = self.guest(&guest);
            let given = if kernel.trim_start_matches('/') == GUEST_KERNEL {
                Some(&self.guest_default)
            } else {
                kernel
                    .strip_prefix("/var/lib/bulkhead/guests/")
                    .and_then(|f| f.strip_suffix(".vmlinuz"))
                    .map(|g| self.guest(g))
            };
            if let Some(given) = given {
                if given.abi != wants.abi {
                    return Err(format!(
                        "service {:?} boots guest {guest:?} (whose modules are built for \
                         kernel {}) with {kernel} (kernel {}): pass --kernel /{}",
                        s.name,
                        wants.abi,
                        given.abi,
                        guest_kernel_link(&guest)
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{Flavour, Suite};
    use std::path::PathBuf;

    fn cfg(flavour: Option<Flavour>, suite: Option<&str>) -> KernelConfig {
        KernelConfig {
            flavour,
            suite: suite.map(str::to_string),
        }
    }

    #[test]
    fn guests_boot_the_hosts_kernel_unless_they_or_the_command_say_otherwise() {
        let guests = vec![
            ("plain".to_string(), None),
            ("gpu".to_string(), Some(cfg(Some(Flavour::Generic), None))),
        ];
        let system = cfg(None, Some("backports"));
        let plan = KernelPlan::new(Some(&system), &guests, &KernelOverrides::default()).unwrap();
        assert_eq!(plan.host, KernelChoice::second());
        assert_eq!(plan.guests["plain"], KernelChoice::second());
        assert_eq!(
            plan.guests["gpu"],
            KernelChoice {
                flavour: Flavour::Generic,
                suite: Suite::Backports
            }
        );
        assert_eq!(plan.choices().len(), 2);
        // The command line's host choice moves the guests that chose nothing along.
        let over = KernelOverrides {
            host: ChoiceOverride::parse(None, Some("system")).unwrap(),
            ..Default::default()
        };
        let plan = KernelPlan::new(Some(&system), &guests, &over).unwrap();
        assert_eq!(plan.host, KernelChoice::default());
        assert_eq!(plan.guests["plain"], KernelChoice::default());
        assert_eq!(plan.guests["gpu"].suite, Suite::System);
        // Its guest choice beats the guests' own.
        let over = KernelOverrides {
            guests: ChoiceOverride::parse(Some("cloud"), Some("stable")).unwrap(),
            ..Default::default()
        };
        let plan = KernelPlan::new(None, &guests, &over).unwrap();
        assert_eq!(plan.host, KernelChoice::default());
        assert_eq!(plan.guests["gpu"].flavour, Flavour::Cloud);
        assert_eq!(plan.guests["gpu"].suite, Suite::Named("stable".into()));
        assert_eq!(plan.guest_default, plan.guests["plain"]);
        assert_eq!(over.tag(), "guests-cloud-stable");
        assert_eq!(KernelOverrides::default().tag(), "");
    }

    fn kernel(abi: &str) -> Kernel {
        Kernel {
            abi: abi.into(),
            vmlinuz: PathBuf::from(format!("/c/{abi}/vmlinuz")),
            modules_dir: PathBuf::from("/c/m"),
            headers_dir: PathBuf::from("/c/h"),
        }
    }

    #[test]
    fn each_guest_kernel_is_carried_once_and_linked_per_guest() {
        let dir = tempfile::tempdir().unwrap();
        let file = |abi: &str| {
            let p = dir.path().join(abi);
            std::fs::write(&p, abi.as_bytes()).unwrap();
            Kernel {
                vmlinuz: p,
                ..kernel(abi)
            }
        };
        let mut k = SystemKernels::all(file("6.1"));
        k.guests.insert("a".into(), file("6.12"));
        k.guests.insert("b".into(), file("6.12"));
        let mut a = Archive::new();
        k.add_guest_kernels(&mut a, &["a", "b", "c"]).unwrap();
        let data = |p: &str| match a.get(p) {
            Some(crate::cpio::Node::File { data, .. }) => data.clone(),
            other => panic!("{p}: {other:?}"),
        };
        let link = |p: &str| match a.get(p) {
            Some(crate::cpio::Node::Symlink { target }) => target.clone(),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(data(GUEST_KERNEL), b"6.1");
        assert_eq!(data("var/lib/bulkhead/kernels/6.12.vmlinuz"), b"6.12");
        assert_eq!(
            link("var/lib/bulkhead/guests/a.vmlinuz"),
            "../kernels/6.12.vmlinuz"
        );
        assert_eq!(
            link("var/lib/bulkhead/guests/b.vmlinuz"),
            "../kernels/6.12.vmlinuz"
        );
        assert_eq!(link("var/lib/bulkhead/guests/c.vmlinuz"), "../vmlinuz");
        let kernels = a
            .paths()
            .filter(|p| p.ends_with(".vmlinuz") && !p.contains("/guests/"))
            .count();
        assert_eq!(kernels, 1, "6.12 carried once");
    }

    #[test]
    fn a_service_must_boot_its_guest_with_the_guests_kernel() {
        let mut k = SystemKernels::all(kernel("6.1"));
        k.guests.insert("new".into(), kernel("6.12"));
        let system = |kernel_path: &str, guest: &str| {
            SystemConfig::parse(
                &format!(
                    "[[service]]\nname = \"vm\"\nexec = [\"/bin/bulkhead-vmm\", \"--kernel\", \"{kernel_path}\", \"--initramfs\", \"/var/lib/bulkhead/guests/{guest}.cpio.gz\"]\n"
                ),
                std::path::Path::new("system.toml"),
            )
            .unwrap()
        };
        assert!(k
            .check_services(&system("/var/lib/bulkhead/vmlinuz", "old"))
            .is_ok());
        assert!(k
            .check_services(&system("/var/lib/bulkhead/guests/new.vmlinuz", "new"))
            .is_ok());
        let e = k
            .check_services(&system("/var/lib/bulkhead/vmlinuz", "new"))
            .unwrap_err();
        assert!(
            e.contains("pass --kernel /var/lib/bulkhead/guests/new.vmlinuz"),
            "{e}"
        );
        assert!(k
            .check_services(&system("/var/lib/bulkhead/guests/new.vmlinuz", "old"))
            .is_err());
    }
}
