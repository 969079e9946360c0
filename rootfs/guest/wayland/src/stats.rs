//! Counters the tests and the benchmark read: bytes copied into shared memory at commits,
//! commits, clients. With a stats file, the app proxy rewrites it (atomically, by rename)
//! after every commit that copied, before the commit is forwarded, so a client that saw its
//! frame callback reads a file that already counts that frame.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters shared by all clients of one proxy.
#[derive(Default)]
pub struct Stats {
    /// Bytes copied from clients' shm pools into virtio_wl shared memory.
    pub copied_bytes: AtomicU64,
    /// Surface commits forwarded.
    pub commits: AtomicU64,
    /// Bytes copied by the last commit that copied anything.
    pub last_commit_bytes: AtomicU64,
    /// Other bytes copied: keymaps and other blobs.
    pub blob_bytes: AtomicU64,
    /// Clients accepted so far.
    pub clients: AtomicU64,
    /// Clients disconnected for a protocol error.
    pub protocol_errors: AtomicU64,
    file: Option<PathBuf>,
    write_lock: Mutex<()>,
}

impl Stats {
    /// Counters that are also written to `file` (if any).
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            ..Default::default()
        }
    }

    /// Counts a commit that copied `bytes`.
    pub fn commit(&self, bytes: u64) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        if bytes > 0 {
            self.copied_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.last_commit_bytes.store(bytes, Ordering::Relaxed);
        }
        self.write();
    }

    /// The counters as `key=value` lines.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "copied_bytes={}\ncommits={}\nlast_commit_bytes={}\nblob_bytes={}\nclients={}\nprotocol_errors={}\n",
            g(&self.copied_bytes),
            g(&self.commits),
            g(&self.last_commit_bytes),
            g(&self.blob_bytes),
            g(&self.clients),
            g(&self.protocol_errors),
        )
    }

    /// Rewrites the stats file (if any); failures are logged, never fatal.
    pub fn write(&self) {
        let Some(path) = &self.file else { return };
        let _guard = self.write_lock.lock();
        let tmp = path.with_extension("tmp");
        let r = std::fs::write(&tmp, self.render()).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = r {
            log::warn!("cannot write the stats file {}: {e}", path.display());
        }
    }
}

/// Reads a counter from a stats file's text.
pub fn parse(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_has_the_counters() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stats");
        let s = Stats::new(Some(f.clone()));
        s.commit(100);
        s.commit(0);
        let t = std::fs::read_to_string(&f).unwrap();
        assert_eq!(parse(&t, "copied_bytes"), Some(100));
        assert_eq!(parse(&t, "commits"), Some(2));
        assert_eq!(parse(&t, "last_commit_bytes"), Some(100));
    }
}
