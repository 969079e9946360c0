//! The initramfs archive: an in-memory tree written as a gzip-compressed newc cpio.
//!
//! Entries are kept sorted by path so the same inputs always give the same bytes, and every
//! parent directory is created implicitly so the kernel's unpacker never meets a file whose
//! directory does not exist yet.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use cpio::newc::{Builder, ModeFileType};
use flate2::write::GzEncoder;
use flate2::Compression;

/// What one archive path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive path {0:?} is not a clean relative path")]
    BadPath(String),
    #[error("archive path {path:?} is used twice (as {first} and {second})")]
    Conflict {
        path: String,
        first: &'static str,
        second: &'static str,
    },
    #[error("{path:?} is {size} bytes, more than newc's 4 GiB limit")]
    TooLarge { path: String, size: usize },
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("writing the archive: {0}")]
    Write(#[from] io::Error),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Dir { .. } => "directory",
            Node::File { .. } => "file",
            Node::Symlink { .. } => "symlink",
            Node::CharDev { .. } => "character device",
        }
    }
}

/// An initramfs under construction.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

fn clean(path: &str) -> Result<String, ArchiveError> {
    let trimmed = path.trim_start_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(trimmed.to_string())
    } else {
        Err(ArchiveError::BadPath(path.to_string()))
    }
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), ArchiveError> {
        let path = clean(path)?;
        // Every ancestor becomes a directory.
        let mut prefix = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in components.iter().take(components.len().saturating_sub(1)) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            match self.entries.get(&prefix) {
                None => {
                    self.entries
                        .insert(prefix.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(other) => {
                    return Err(ArchiveError::Conflict {
                        path: prefix,
                        first: other.kind(),
                        second: "directory",
                    })
                }
            }
        }
        match self.entries.get(&path) {
            None => {
                self.entries.insert(path, node);
                Ok(())
            }
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {
                self.entries.insert(path, node);
                Ok(())
            }
            Some(existing) if *existing == node => Ok(()),
            Some(existing) => Err(ArchiveError::Conflict {
                path,
                first: existing.kind(),
                second: node.kind(),
            }),
        }
    }

    /// A directory (parents are created as needed).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), ArchiveError> {
        self.insert(path, Node::Dir { mode })
    }

    /// A regular file with the given contents.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), ArchiveError> {
        if u32::try_from(data.len()).is_err() {
            return Err(ArchiveError::TooLarge {
                path: path.to_string(),
                size: data.len(),
            });
        }
        self.insert(path, Node::File { mode, data })
    }

    /// A regular file copied from the build machine.
    pub fn file_from(&mut self, path: &str, mode: u32, src: &Path) -> Result<(), ArchiveError> {
        let data = std::fs::read(src).map_err(|source| ArchiveError::Read {
            path: src.display().to_string(),
            source,
        })?;
        self.file(path, mode, data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), ArchiveError> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        )
    }

    pub fn char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ArchiveError> {
        self.insert(path, Node::CharDev { mode, major, minor })
    }

    /// Looks an entry up by path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.entries.get(path.trim_start_matches('/'))
    }

    /// All paths, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Writes the uncompressed newc stream.
    pub fn write_newc<W: Write>(&self, mut out: W) -> Result<W, ArchiveError> {
        for (ino, (path, node)) in (1u32..).zip(self.entries.iter()) {
            let b = Builder::new(path).ino(ino).uid(0).gid(0).mtime(0);
            let (b, data): (Builder, &[u8]) = match node {
                Node::Dir { mode } => (
                    b.mode(*mode)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    &[],
                ),
                Node::File { mode, data } => (
                    b.mode(*mode)
                        .set_mode_file_type(ModeFileType::Regular)
                        .nlink(1),
                    data,
                ),
                Node::Symlink { target } => (
                    b.mode(0o777)
                        .set_mode_file_type(ModeFileType::Symlink)
                        .nlink(1),
                    target.as_bytes(),
                ),
                Node::CharDev { mode, major, minor } => (
                    b.mode(*mode)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .nlink(1),
                    &[],
                ),
            };
            let size = u32::try_from(data.len()).map_err(|_| ArchiveError::TooLarge {
                path: path.clone(),
                size: data.len(),
            })?;
            let mut w = b.write(out, size);
            w.write_all(data)?;
            out = w.finish()?;
        }
        Ok(cpio::newc::trailer(out)?)
    }

    /// Writes the gzip-compressed newc archive the kernel unpacks as an initramfs.
    pub fn write_gz<W: Write>(&self, out: W) -> Result<W, ArchiveError> {
        let enc = GzEncoder::new(out, Compression::new(6));
        let enc = self.write_newc(enc)?;
        Ok(enc.finish()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn read_back(bytes: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut r = bytes;
        loop {
            let mut rd = cpio::NewcReader::new(r).unwrap();
            if rd.entry().is_trailer() {
                break;
            }
            let e = rd.entry();
            let (name, mode, rmaj, rmin) = (
                e.name().to_string(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            );
            let mut data = Vec::new();
            rd.read_to_end(&mut data).unwrap();
            out.push((name, mode, rmaj, rmin, data));
            r = rd.finish().unwrap();
        }
        out
    }

    #[test]
    fn newc_round_trip_keeps_types_modes_and_devices() {
        let mut a = Archive::new();
        a.file("/init", 0o755, b"#!init".to_vec()).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.symlink("bin/sh", "/init").unwrap();
        a.dir("proc", 0o555).unwrap();
        let bytes = a.write_newc(Vec::new()).unwrap();
        let entries = read_back(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/sh", "dev", "dev/console", "init", "proc"]
        );
        let console = &entries[3];
        assert_eq!(console.1, 0o020600, "char device with mode 0600");
        assert_eq!((console.2, console.3), (5, 1));
        assert_eq!(entries[1].4, b"/init");
        assert_eq!(entries[1].1 & 0o170000, 0o120000, "symlink type");
        assert_eq!(entries[4].4, b"#!init");
        assert_eq!(entries[4].1, 0o100755);
        assert_eq!(entries[5].1, 0o040555);
    }

    #[test]
    fn gzip_output_decompresses_to_the_same_newc_stream() {
        let mut a = Archive::new();
        a.file("etc/x", 0o644, vec![7; 10_000]).unwrap();
        let plain = a.write_newc(Vec::new()).unwrap();
        let gz = a.write_gz(Vec::new()).unwrap();
        assert!(gz.len() < plain.len());
        let mut dec = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut dec)
            .unwrap();
        assert_eq!(dec, plain);
    }

    #[test]
    fn output_is_deterministic_whatever_the_insertion_order() {
        let mut a = Archive::new();
        a.file("b/2", 0o644, b"2".to_vec()).unwrap();
        a.file("a/1", 0o644, b"1".to_vec()).unwrap();
        let mut b = Archive::new();
        b.file("a/1", 0o644, b"1".to_vec()).unwrap();
        b.file("b/2", 0o644, b"2".to_vec()).unwrap();
        assert_eq!(
            a.write_newc(Vec::new()).unwrap(),
            b.write_newc(Vec::new()).unwrap()
        );
    }

    #[test]
    fn conflicting_and_unclean_paths_are_refused() {
        let mut a = Archive::new();
        a.file("etc/x", 0o644, vec![]).unwrap();
        assert!(matches!(
            a.file("etc/x/y", 0o644, vec![]),
            Err(ArchiveError::Conflict { .. })
        ));
        assert!(matches!(
            a.symlink("etc/x", "/y"),
            Err(ArchiveError::Conflict { .. })
        ));
        assert!(matches!(
            a.file("../x", 0o644, vec![]),
            Err(ArchiveError::BadPath(_))
        ));
        assert!(matches!(
            a.file("a//b", 0o644, vec![]),
            Err(ArchiveError::BadPath(_))
        ));
        // The same content twice is fine (idempotent).
        a.file("etc/x", 0o644, vec![]).unwrap();
    }
}
