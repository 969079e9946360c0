//! Data transfers (clipboard, primary selection, drag and drop): a pipe on one side, a
//! virtio_wl pipe on the other, and a thread that moves the bytes until EOF.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Most transfers running at once in one proxy; past it a transfer is dropped (both ends
/// closed: the reader sees EOF at once).
pub const MAX_TRANSFERS: usize = 64;

static RUNNING: AtomicUsize = AtomicUsize::new(0);

struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies everything from `from` to `to` on a thread of its own, then closes both.
pub fn splice(what: &'static str, mut from: Box<dyn Read + Send>, mut to: Box<dyn Write + Send>) {
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_TRANSFERS {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        log::warn!("{what}: too many transfers at once; this one is dropped");
        return;
    }
    let slot = Slot;
    let r = std::thread::Builder::new()
        .name("wl-transfer".into())
        .spawn(move || {
            let _slot = slot;
            match std::io::copy(&mut from, &mut to) {
                Ok(n) => log::debug!("{what}: {n} bytes"),
                Err(e) => log::info!("{what} ended: {e}"),
            }
        });
    if let Err(e) = r {
        log::warn!("{what}: no thread for the transfer: {e}");
    }
}

/// Transfers running now.
pub fn running() -> usize {
    RUNNING.load(Ordering::SeqCst)
}
