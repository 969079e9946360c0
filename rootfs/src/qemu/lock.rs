//! Machines on one build machine run one at a time (a lock file), each with a scratch
//! directory for its sockets.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};

use super::{DEFAULT_LOCK_FILE, FIRST_LINE_PREFIX};

/// The one-at-a-time lock for machines on this build machine.
pub(super) fn machine_lock(echo: bool) -> Option<Flock<File>> {
    let path = std::env::var_os("BULKHEAD_QEMU_LOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_FILE));
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            log::warn!("{}: {e}; machines are not serialised", path.display());
            return None;
        }
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Some(l),
        Err((file, _)) => {
            let msg = format!(
                "{FIRST_LINE_PREFIX} waiting for another machine on this build machine to end \
                 (lock {})",
                path.display()
            );
            if echo {
                println!("{msg}");
            } else {
                eprintln!("{msg}");
            }
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(l) => Some(l),
                Err((_, e)) => {
                    log::warn!("{}: {e}; machines are not serialised", path.display());
                    None
                }
            }
        }
    }
}

/// A scratch directory removed on drop.
pub(super) struct ScratchDir(pub(super) PathBuf);

impl ScratchDir {
    pub(super) fn new() -> std::io::Result<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-qemu-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
