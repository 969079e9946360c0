//! Bulkhead policy: the language, its validation and evaluation, and the pieces `policyctl`
//! is built from.
//!
//! The hub (crate `bulkhead-ipc`) loads a tree with [`PolicyTree::load`], compiles it with
//! [`PolicyTree::compile`] into an immutable [`Policy`], and calls [`Policy::check_connect`],
//! [`Policy::check_transfer`] and [`Policy::quota_for`]; init calls [`Policy::devices_for`]
//! and [`sysfs::check_devices`]. The fd vocabulary ([`FdType`], [`Rights`]) is defined here
//! and reused by the hub. See `docs/policy.md`.

pub mod ast;
pub mod bench;
pub mod cli;
pub mod control;
pub mod diag;
pub mod diff;
pub mod edit;
pub mod eval;
pub mod explain;
pub mod fmt;
pub mod fuzz_check;
pub mod lex;
pub mod parse;
pub mod rights;
pub mod sysfs;
pub mod tree;
pub mod validate;

pub use ast::{Action, Bdf, DeviceId, Effect, Reset, Rule, Subject};
pub use diag::{Diagnostic, Diagnostics, Severity};
pub use eval::{
    ConnectionCaps, Decision, Denial, DenyKind, DeviceGrant, GuestError, Policy, Provider, Quota,
    QuotaValue, RuleRef, SYSTEM_VMS,
};
pub use rights::{Direction, FdCaps, FdType, Rights};
pub use tree::{PolicyTree, RootDir};
pub use validate::{Compiled, ValidateOptions};

#[cfg(test)]
pub(crate) mod testutil {
    use crate::{Compiled, Diagnostics, Policy, PolicyTree, ValidateOptions};

    /// Compile in-memory files.
    pub fn compile_with(
        files: &[(&str, &str)],
        opts: &ValidateOptions,
    ) -> Result<Compiled, Diagnostics> {
        let src: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(n, t)| (n.to_string(), t.as_bytes().to_vec()))
            .collect();
        PolicyTree::from_sources(&src).compile(opts)
    }

    /// Compile in-memory files that must be valid.
    pub fn policy(files: &[(&str, &str)]) -> Policy {
        match compile_with(files, &ValidateOptions::default()) {
            Ok(c) => c.policy,
            Err(e) => panic!("invalid test policy:\n{e}"),
        }
    }

    /// The errors of in-memory files that must be invalid.
    pub fn errors(files: &[(&str, &str)]) -> Vec<crate::Diagnostic> {
        match compile_with(files, &ValidateOptions::default()) {
            Ok(_) => panic!("policy unexpectedly valid"),
            Err(e) => e.0.into_iter().filter(|d| d.is_error()).collect(),
        }
    }
}
