//! Which Debian kernel: a flavour (`cloud`, `generic`) from a suite (the build machine's own
//! apt sources, its release's backports, or any Debian suite). Chosen per host and per guest
//! in system.toml / guest.toml (`[kernel]`), and on `bulkhead-rootfs` commands.

use bulkhead_init::config::{valid_suite_name, KernelConfig};

pub use bulkhead_init::config::KernelFlavour as Flavour;

/// A choice that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error("kernel flavour {0:?}: choose \"cloud\" or \"generic\"")]
    Flavour(String),
    #[error("kernel suite {0:?}: a Debian suite is 1 to 40 of [a-z0-9-] (\"system\", \"backports\", \"stable\", \"bookworm-backports\", …)")]
    Suite(String),
}

/// Where the kernel package comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Suite {
    /// Whatever the build machine's own apt sources offer (Debian 12: 6.1; Debian 13: 6.12).
    #[default]
    System,
    /// `<the build machine's codename>-backports` (Debian 12: the 6.12 line).
    Backports,
    /// A Debian suite or codename by name (`stable`, `trixie`, `bookworm-backports`, …).
    Named(String),
}

impl Suite {
    pub fn parse(s: &str) -> Result<Self, ChoiceError> {
        match s {
            "system" => Ok(Self::System),
            "backports" => Ok(Self::Backports),
            s if valid_suite_name(s) => Ok(Self::Named(s.to_string())),
            s => Err(ChoiceError::Suite(s.to_string())),
        }
    }

    /// The word used in configuration files and cache names.
    pub fn name(&self) -> &str {
        match self {
            Self::System => "system",
            Self::Backports => "backports",
            Self::Named(s) => s,
        }
    }
}

/// The Debian metapackage whose dependency names a flavour's current kernel ABI.
pub fn metapackage(flavour: Flavour) -> &'static str {
    match flavour {
        Flavour::Cloud => "linux-image-cloud-amd64",
        Flavour::Generic => "linux-image-amd64",
    }
}

/// A flavour's name in configuration files and cache names.
pub fn flavour_name(flavour: Flavour) -> &'static str {
    match flavour {
        Flavour::Cloud => "cloud",
        Flavour::Generic => "generic",
    }
}

/// Parses `cloud` / `generic`.
pub fn parse_flavour(s: &str) -> Result<Flavour, ChoiceError> {
    match s {
        "cloud" => Ok(Flavour::Cloud),
        "generic" => Ok(Flavour::Generic),
        s => Err(ChoiceError::Flavour(s.to_string())),
    }
}

/// One kernel: a flavour from a suite.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelChoice {
    pub flavour: Flavour,
    pub suite: Suite,
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kernel from {}",
            flavour_name(self.flavour),
            self.suite.name()
        )
    }
}

impl KernelChoice {
    /// The second kernel the tests boot (and `provision` fetches): Debian's cloud kernel from
    /// the build machine's backports, the 6.12 line on Debian 12.
    pub fn second() -> Self {
        Self {
            flavour: Flavour::Cloud,
            suite: Suite::Backports,
        }
    }

    /// The name of this choice in the cache (`system-cloud`, `backports-generic`, …).
    pub fn key(&self) -> String {
        format!("{}-{}", self.suite.name(), flavour_name(self.flavour))
    }

    /// `over` applied on top of `self`: what `over` says, the rest from `self`.
    pub fn with(&self, over: &ChoiceOverride) -> Self {
        Self {
            flavour: over.flavour.unwrap_or(self.flavour),
            suite: over.suite.clone().unwrap_or_else(|| self.suite.clone()),
        }
    }
}

/// A partial choice: a file's `[kernel]` table or a command's `--flavour` / `--suite`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChoiceOverride {
    pub flavour: Option<Flavour>,
    pub suite: Option<Suite>,
}

impl ChoiceOverride {
    /// From a configuration file's `[kernel]` table (already checked by its parser).
    pub fn from_config(k: &KernelConfig) -> Result<Self, ChoiceError> {
        Ok(Self {
            flavour: k.flavour,
            suite: k.suite.as_deref().map(Suite::parse).transpose()?,
        })
    }

    /// From command-line words.
    pub fn parse(flavour: Option<&str>, suite: Option<&str>) -> Result<Self, ChoiceError> {
        Ok(Self {
            flavour: flavour.map(parse_flavour).transpose()?,
            suite: suite.map(Suite::parse).transpose()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.flavour.is_none() && self.suite.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_and_flavours_parse_and_name_their_cache_entry() {
        assert_eq!(Suite::parse("system").unwrap(), Suite::System);
        assert_eq!(Suite::parse("backports").unwrap(), Suite::Backports);
        assert_eq!(
            Suite::parse("bookworm-backports").unwrap(),
            Suite::Named("bookworm-backports".into())
        );
        assert!(Suite::parse("Stable").is_err());
        assert!(Suite::parse("../x").is_err());
        assert!(parse_flavour("rt").is_err());
        assert_eq!(KernelChoice::default().key(), "system-cloud");
        assert_eq!(KernelChoice::second().key(), "backports-cloud");
        let generic_stable = KernelChoice::default()
            .with(&ChoiceOverride::parse(Some("generic"), Some("stable")).unwrap());
        assert_eq!(generic_stable.key(), "stable-generic");
        assert_eq!(generic_stable.to_string(), "generic kernel from stable");
        assert_eq!(metapackage(generic_stable.flavour), "linux-image-amd64");
    }

    #[test]
    fn an_override_changes_only_what_it_names() {
        let base = KernelChoice::second();
        let only_flavour = ChoiceOverride::parse(Some("generic"), None).unwrap();
        assert_eq!(
            base.with(&only_flavour),
            KernelChoice {
                flavour: Flavour::Generic,
                suite: Suite::Backports
            }
        );
        assert_eq!(base.with(&ChoiceOverride::default()), base);
    }
}
