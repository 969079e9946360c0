//! `[log]`: the per-service log rings and the log disk.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::parse_size;

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Lines each service's ring in init's memory keeps (`bulkhead-ctl log`).
    #[serde(default = "default_ring_lines")]
    pub ring_lines: u32,
    /// Bytes each ring keeps, e.g. `64K`.
    #[serde(default = "default_ring_bytes")]
    pub ring_bytes: String,
    /// A directory where every service's lines are also written, one file per service
    /// (`<name>.log`), rotated by size: a disk on real hardware. Absent: memory only.
    pub dir: Option<PathBuf>,
    /// A block device the log writer mounts on `dir` first (e.g. `/dev/vda`).
    pub device: Option<PathBuf>,
    /// Its filesystem (default `ext4`).
    pub fstype: Option<String>,
    /// A file to copy into `dir` as it grows (the hub's audit log), rotated the same way.
    pub audit: Option<PathBuf>,
    /// A file is rotated (`.1`, `.2`, …) once it reaches this size, e.g. `1M`.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: String,
    /// Rotated files kept per log.
    #[serde(default = "default_keep_files")]
    pub keep_files: u32,
}

fn default_ring_lines() -> u32 {
    1000
}
fn default_ring_bytes() -> String {
    "64K".into()
}
fn default_max_file_bytes() -> String {
    "1M".into()
}
fn default_keep_files() -> u32 {
    4
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            ring_lines: default_ring_lines(),
            ring_bytes: default_ring_bytes(),
            dir: None,
            device: None,
            fstype: None,
            audit: None,
            max_file_bytes: default_max_file_bytes(),
            keep_files: default_keep_files(),
        }
    }
}

impl LogConfig {
    /// The ring's byte bound.
    pub fn ring_bytes(&self) -> usize {
        parse_size(&self.ring_bytes)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(64 << 10)
    }

    /// The rotation size.
    pub fn max_file_bytes(&self) -> u64 {
        parse_size(&self.max_file_bytes).unwrap_or(1 << 20)
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if !(1..=100_000).contains(&self.ring_lines) {
            return Err("[log] ring_lines must be 1 to 100000".into());
        }
        let rb = parse_size(&self.ring_bytes).map_err(|e| format!("[log] ring_bytes: {e}"))?;
        if !(1024..=(16 << 20)).contains(&rb) {
            return Err("[log] ring_bytes must be 1K to 16M".into());
        }
        let mb =
            parse_size(&self.max_file_bytes).map_err(|e| format!("[log] max_file_bytes: {e}"))?;
        if mb < 4096 {
            return Err("[log] max_file_bytes must be at least 4K".into());
        }
        if !(1..=100).contains(&self.keep_files) {
            return Err("[log] keep_files must be 1 to 100".into());
        }
        for (what, p) in [
            ("dir", &self.dir),
            ("device", &self.device),
            ("audit", &self.audit),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() || p == Path::new("/") {
                    return Err(format!(
                        "[log] {what} {}: an absolute path other than /",
                        p.display()
                    ));
                }
            }
        }
        if self.dir.is_none() && (self.device.is_some() || self.audit.is_some()) {
            return Err("[log] device and audit need dir".into());
        }
        if let Some(t) = &self.fstype {
            if t.is_empty() || t.len() > 32 || !t.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("[log] fstype {t:?}: a filesystem name like ext4"));
            }
        }
        Ok(())
    }
}
