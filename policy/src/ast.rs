//! The typed syntax tree of one policy file, and its canonical text form.
//!
//! `Display` on [`Rule`] gives the canonical single-space line that `policyctl grant`
//! appends and `fmt` aligns: parsing that text gives back an equal rule.

use crate::rights::FdCaps;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Who a rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subject {
    /// One VM by name.
    Vm(String),
    /// `@name`: every member of a group.
    Group(String),
    /// `@any`: every VM except the system VMs.
    Any,
}

impl Subject {
    /// 0 for `@any`, 1 for a group, 2 for a VM: higher wins for scalar settings.
    pub fn specificity(&self) -> u8 {
        match self {
            Subject::Any => 0,
            Subject::Group(_) => 1,
            Subject::Vm(_) => 2,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Vm(v) => f.write_str(v),
            Subject::Group(g) => write!(f, "@{g}"),
            Subject::Any => f.write_str("@any"),
        }
    }
}

/// `grant` or `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Effect {
    /// Allows (union of all grants).
    Grant,
    /// Forbids; always beats a grant.
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Grant => "grant",
            Effect::Deny => "deny",
        })
    }
}

/// A PCI function address, `DDDD:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bdf {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// The `id=` of a device grant: a pinned vendor:device, or an explicit `any`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeviceId {
    /// `id=any`.
    Any,
    /// `id=VVVV:DDDD`.
    Pinned {
        /// PCI vendor id.
        vendor: u16,
        /// PCI device id.
        device: u16,
    },
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Any => f.write_str("any"),
            DeviceId::Pinned { vendor, device } => write!(f, "{vendor:04x}:{device:04x}"),
        }
    }
}

/// The `reset=` of a device grant.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Reset {
    /// The device must support a function reset (default).
    #[default]
    Required,
    /// Assign even without a reset method (logged as a warning).
    Optional,
}

/// What a rule grants or denies.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// `device pci:BDF [id=…] [reset=…] [shared=exclusive-run] [boot-display=take]`.
    Device {
        /// The PCI function.
        bdf: Bdf,
        /// `id=` (required on grants, absent on denies).
        id: Option<DeviceId>,
        /// `reset=`; `None` when not written (means required).
        reset: Option<Reset>,
        /// `shared=exclusive-run`: several VMs may own it, one running at a time.
        shared: bool,
        /// `boot-display=take`: the grant takes the boot VGA device (the firmware's screen)
        /// on purpose; without it such a device is refused as host-critical.
        boot_display: bool,
    },
    /// `provide SERVICE [c2s=…] [s2c=…] [max-fds=N] [max-conns=N]`.
    Provide {
        /// The service name.
        service: String,
        /// Client → provider contract (`None`: not written, meaning none).
        c2s: Option<FdCaps>,
        /// Provider → client contract.
        s2c: Option<FdCaps>,
        /// Most fds per message.
        max_fds: Option<u32>,
        /// Most concurrent connections.
        max_conns: Option<u32>,
    },
    /// `connect SERVICE[@PROVIDER] [c2s=…] [s2c=…]`: may only narrow the contract.
    Connect {
        /// The service name.
        service: String,
        /// The provider, when written.
        provider: Option<String>,
        /// Narrowed client → provider caps (`None`: the contract's).
        c2s: Option<FdCaps>,
        /// Narrowed provider → client caps.
        s2c: Option<FdCaps>,
    },
    /// `quota [shm=SIZE] [shm-count=N] [vfds=N]`.
    Quota {
        /// Bytes of shared memory the VM may allocate.
        shm: Option<u64>,
        /// Number of shared memory objects.
        shm_count: Option<u64>,
        /// Number of VFDs the VM may hold.
        vfds: Option<u64>,
    },
}

impl Action {
    /// The verb keyword.
    pub fn verb(&self) -> &'static str {
        match self {
            Action::Device { .. } => "device",
            Action::Provide { .. } => "provide",
            Action::Connect { .. } => "connect",
            Action::Quota { .. } => "quota",
        }
    }

    /// The object as written canonically (empty for quota).
    pub fn object(&self) -> String {
        match self {
            Action::Device { bdf, .. } => format!("pci:{bdf}"),
            Action::Provide { service, .. } => service.clone(),
            Action::Connect {
                service, provider, ..
            } => match provider {
                Some(p) => format!("{service}@{p}"),
                None => service.clone(),
            },
            Action::Quota { .. } => String::new(),
        }
    }

    /// The parameters in canonical order and form.
    pub fn params(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Action::Device {
                id,
                reset,
                shared,
                boot_display,
                ..
            } => {
                if let Some(id) = id {
                    out.push(format!("id={id}"));
                }
                match reset {
                    Some(Reset::Optional) => out.push("reset=optional".into()),
                    Some(Reset::Required) => out.push("reset=required".into()),
                    None => {}
                }
                if *shared {
                    out.push("shared=exclusive-run".into());
                }
                if *boot_display {
                    out.push("boot-display=take".into());
                }
            }
            Action::Provide {
                c2s,
                s2c,
                max_fds,
                max_conns,
                ..
            } => {
                if let Some(c) = c2s {
                    out.push(format!("c2s={c}"));
                }
                if let Some(c) = s2c {
                    out.push(format!("s2c={c}"));
                }
                if let Some(n) = max_fds {
                    out.push(format!("max-fds={n}"));
                }
                if let Some(n) = max_conns {
                    out.push(format!("max-conns={n}"));
                }
            }
            Action::Connect { c2s, s2c, .. } => {
                if let Some(c) = c2s {
                    out.push(format!("c2s={c}"));
                }
                if let Some(c) = s2c {
                    out.push(format!("s2c={c}"));
                }
            }
            Action::Quota {
                shm,
                shm_count,
                vfds,
            } => {
                if let Some(s) = shm {
                    out.push(format!("shm={}", format_size(*s)));
                }
                if let Some(n) = shm_count {
                    out.push(format!("shm-count={n}"));
                }
                if let Some(n) = vfds {
                    out.push(format!("vfds={n}"));
                }
            }
        }
        out
    }
}

/// A `grant` or `deny` line.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    /// Grant or deny.
    pub effect: Effect,
    /// Who.
    pub subject: Subject,
    /// What.
    pub action: Action,
}

impl Rule {
    /// `SUBJ VERB OBJ` — what `revoke` matches on.
    pub fn key(&self) -> (Effect, Subject, &'static str, String) {
        (
            self.effect,
            self.subject.clone(),
            self.action.verb(),
            self.action.object(),
        )
    }
}

/// The canonical single-space line.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.effect, self.subject, self.action.verb())?;
        let obj = self.action.object();
        if !obj.is_empty() {
            write!(f, " {obj}")?;
        }
        for p in self.action.params() {
            write!(f, " {p}")?;
        }
        Ok(())
    }
}

/// A size in the largest binary unit that represents it exactly (`64MiB`, `1536KiB`, `7B`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (mult, unit) in UNITS {
        if bytes != 0 && bytes % mult == 0 {
            return format!("{}{unit}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

/// One meaningful line of a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    /// `version N`.
    Version(u32),
    /// `group NAME VM…`.
    Group {
        /// The group name (without `@`).
        name: String,
        /// The member VMs.
        members: Vec<String>,
    },
    /// `include RELPATH`.
    Include(String),
    /// `grant …` / `deny …`.
    Rule(Rule),
}

/// A parsed line with its position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// 1-based line number.
    pub line: u32,
    /// The directive or rule.
    pub item: Item,
    /// Column of each word, with the word's key (the text before `=`, or the whole word):
    /// lets validation point at the subject, object or parameter it complains about.
    pub words: Vec<(u32, String)>,
}

impl Line {
    /// Column of word `i` (0 = keyword, 1 = subject, 2 = verb, 3 = object), or 1.
    pub fn col(&self, i: usize) -> u32 {
        self.words.get(i).map_or(1, |w| w.0)
    }

    /// Column of the `key=` parameter, or of the object when absent.
    pub fn param_col(&self, key: &str) -> u32 {
        self.words
            .iter()
            .skip(3)
            .find(|w| w.1 == key)
            .map_or(self.col(3), |w| w.0)
    }
}

/// A parsed policy file: its name and the meaningful lines in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParsedFile {
    /// The file name relative to its tree root (what provenance shows).
    pub name: String,
    /// The meaningful lines.
    pub lines: Vec<Line>,
}
