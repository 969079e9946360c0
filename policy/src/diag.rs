//! Diagnostics: `path:line:col: error: message` plus an optional `help:` line.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How bad a diagnostic is. Warnings become errors with `--strict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The tree is invalid.
    Error,
    /// Suspicious but valid (an error with `--strict`).
    Warning,
}

/// One message about a place in a policy file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file, as shown to the user.
    pub path: String,
    /// 1-based line (0 for the tree as a whole).
    pub line: u32,
    /// 1-based column in characters (0 for the whole line or file).
    pub col: u32,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error at `path:line:col`.
    pub fn error(path: &str, line: u32, col: u32, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            path: path.to_string(),
            line,
            col,
            message: message.into(),
            help: None,
        }
    }

    /// A warning at `path:line:col`.
    pub fn warning(path: &str, line: u32, col: u32, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(path, line, col, message)
        }
    }

    /// Attach a `help:` line.
    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        match (self.line, self.col) {
            (0, _) => write!(f, "{}: {sev}: {}", self.path, self.message)?,
            (l, 0) => write!(f, "{}:{l}: {sev}: {}", self.path, self.message)?,
            (l, c) => write!(f, "{}:{l}:{c}: {sev}: {}", self.path, self.message)?,
        }
        if let Some(h) = &self.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

/// A list of diagnostics that contains at least one error; the error type of loading and
/// validation.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
#[error("{}", render(.0))]
pub struct Diagnostics(pub Vec<Diagnostic>);

fn render(d: &[Diagnostic]) -> String {
    d.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Diagnostics {
    /// Number of errors (not warnings).
    pub fn error_count(&self) -> usize {
        self.0.iter().filter(|d| d.is_error()).count()
    }
}
