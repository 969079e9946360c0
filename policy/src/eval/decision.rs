//! What an evaluation answers: decisions with the rules that made them, denials and their
//! reasons (for the host's audit log only), and the grants' values (providers, connection
//! rights, devices, quotas).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ast::{Bdf, DeviceId, Reset, Rule};
use crate::rights::{Direction, FdCaps};
/// VMs that `@any` never matches: they must be named explicitly.
pub const SYSTEM_VMS: [&str; 2] = ["host", "hub"];

/// True for the host and the hub.
pub fn is_system_vm(vm: &str) -> bool {
    SYSTEM_VMS.contains(&vm)
}

/// Where a rule is: `file:line`. Serialized as that string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    /// The tree-relative file name.
    pub file: Arc<str>,
    /// 1-based line.
    pub line: u32,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl fmt::Debug for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Serialize for RuleRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RuleRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (file, line) = s
            .rsplit_once(':')
            .ok_or_else(|| serde::de::Error::custom("expected file:line"))?;
        let line = line.parse().map_err(serde::de::Error::custom)?;
        Ok(RuleRef {
            file: Arc::from(file),
            line,
        })
    }
}

/// A rule with its provenance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEntry {
    /// The rule.
    pub rule: Rule,
    /// Where it is.
    pub at: RuleRef,
}

/// Why something was denied (for the audit log and `explain`; never sent to a guest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyKind {
    /// No grant matches (default deny).
    NoGrant,
    /// A deny rule matches (deny always wins).
    DeniedByRule,
    /// No VM provides the service.
    NoProvider,
    /// The named provider is not the service's provider.
    WrongProvider,
    /// The fd type is not in the connection's caps for this direction.
    TypeNotAllowed,
    /// None of the requested rights survives the caps.
    RightsNotAllowed,
    /// The requested rights are not valid for the fd type (e.g. `pipe` + `map`).
    InvalidRights,
    /// More fds in one message than `max-fds`.
    TooManyFds,
}

/// What the guest sees for a denial: only these two, so a denial never reveals whether a
/// target exists or which rule said no.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestError {
    /// Not allowed (virtio_wl `PermissionDenied`).
    PermissionDenied,
    /// Malformed request (virtio_wl `InvalidArgs`).
    InvalidArgs,
}

impl DenyKind {
    /// The error to return to the guest.
    pub fn guest_error(self) -> GuestError {
        match self {
            DenyKind::InvalidRights | DenyKind::TooManyFds => GuestError::InvalidArgs,
            _ => GuestError::PermissionDenied,
        }
    }
}

/// A denial: kind plus a human reason for the host audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// Machine-readable kind.
    pub kind: DenyKind,
    /// Human reason (host only). Hot denials use a fixed text: the audit record carries the
    /// source, object, fd type and rights beside it, and fixed texts coalesce well.
    pub reason: Cow<'static, str>,
}

/// The result of a check: what was allowed (or why not) and the rules that decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision<T> {
    /// `Ok(what is granted)` or `Err(denial)`.
    pub outcome: Result<T, Denial>,
    /// The rules that made the decision: matching grants, or the winning deny.
    pub rules: Vec<RuleRef>,
}

impl<T> Decision<T> {
    /// True when allowed.
    pub fn is_allowed(&self) -> bool {
        self.outcome.is_ok()
    }

    pub(super) fn deny(
        kind: DenyKind,
        reason: impl Into<Cow<'static, str>>,
        rules: Vec<RuleRef>,
    ) -> Decision<T> {
        Decision {
            outcome: Err(Denial {
                kind,
                reason: reason.into(),
            }),
            rules,
        }
    }
}

/// A service's provider and fd contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provider {
    /// The providing VM.
    pub vm: String,
    /// Client → provider contract.
    pub c2s: FdCaps,
    /// Provider → client contract.
    pub s2c: FdCaps,
    /// Most fds per message.
    pub max_fds: u32,
    /// Most concurrent connections (None: unlimited).
    pub max_conns: Option<u32>,
    /// The `provide` rule.
    pub at: RuleRef,
}

/// What an allowed connection may carry: computed once by `check_connect` and kept by the
/// hub with the connection; `check_transfer` checks each message against it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCaps {
    /// The providing VM (the connection's other end).
    pub provider: String,
    /// Effective client → provider caps (contract ∩ connect narrowing).
    pub c2s: FdCaps,
    /// Effective provider → client caps.
    pub s2c: FdCaps,
    /// Most fds per message.
    pub max_fds: u32,
    /// Most concurrent connections to the service.
    pub max_conns: Option<u32>,
    /// The provide rule and the winning connect grants.
    pub rules: Vec<RuleRef>,
}

impl ConnectionCaps {
    /// The caps for one direction.
    pub fn caps(&self, dir: Direction) -> &FdCaps {
        match dir {
            Direction::C2s => &self.c2s,
            Direction::S2c => &self.s2c,
        }
    }
}

/// A PCI function a VM may own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceGrant {
    /// The function.
    pub bdf: Bdf,
    /// The vendor:device pin (or `any`); checked at VM start.
    pub id: DeviceId,
    /// Whether a reset method is required.
    pub reset: Reset,
    /// `shared=exclusive-run`.
    pub shared: bool,
    /// `boot-display=take`: the grant may take the boot VGA device.
    #[serde(default)]
    pub boot_display: bool,
    /// The grant.
    pub at: RuleRef,
}

/// One quota value and the rule that set it (None: nothing set, the value is 0).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaValue {
    /// The limit.
    pub value: u64,
    /// The most specific rule that set it.
    pub from: Option<RuleRef>,
}

/// A VM's memfd-server quota; each key is resolved by specificity (VM > group > `@any`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Bytes of shared memory.
    pub shm: QuotaValue,
    /// Number of shared memory objects.
    pub shm_count: QuotaValue,
    /// Number of VFDs held.
    pub vfds: QuotaValue,
}
