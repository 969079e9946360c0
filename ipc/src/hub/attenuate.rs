//! Attenuation at the kernel level: a memfd delivered without WRITE goes out as a read-only
//! description (made once per object and cached), and a memfd delivered with attenuated
//! rights gets the hub's OFD lock and a probe, so its tombstone lasts as long as a
//! description the hub passed may be open.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::classify::{FdKind, ObjKey};

use super::memfd_server;
use super::queue::OutFd;
use super::router;
use super::Hub;

/// Most cached read-only memfd descriptions.
pub(super) const RO_CACHE: usize = 256;

impl Hub {
    /// For a memfd delivered with attenuated rights (a tombstone may have to outlive its
    /// entries, see [`handles::Handles`]): the sender's description gets the hub's OFD lock
    /// (read-only copies get it when made), and the first time the object is seen the hub
    /// keeps a probe of it (returned, kept once the frame commits), so a sweep can tell when no description it passed is open.
    /// The memfd server's own allocations are tracked by the server. A failure only costs
    /// the probe (the tombstone then lasts until every VM that held the object is gone).
    pub(super) fn track_attenuated(
        &mut self,
        approved: &[router::Approved],
        fds: &[OwnedFd],
    ) -> Vec<(ObjKey, OwnedFd)> {
        let mut probes = Vec::new();
        for (a, fd) in approved.iter().zip(fds) {
            let key = a.class.key;
            if a.class.kind != FdKind::Memfd
                || a.rights.contains(a.class.max_rights)
                || self.memfd.is_alloc(key)
            {
                continue;
            }
            if let Err(e) = memfd_server::lock_description(fd.as_fd()) {
                log::debug!("memfd {key:?}: cannot lock the sender's description: {e}");
                continue;
            }
            if !self.handles.has_probe(key) {
                match self.memfd.probe(fd.as_fd()) {
                    Ok(p) => probes.push((key, p)),
                    Err(e) => log::debug!("memfd {key:?}: no probe: {e}"),
                }
            }
        }
        probes
    }

    /// A memfd delivered without WRITE goes out as a read-only description, so the receiver's
    /// kernel-level access matches its rights. The description is made once per object and
    /// cached; each delivery shares it (no dup per frame).
    pub(super) fn attenuate_memfds(
        &mut self,
        approved: &[router::Approved],
        fds: Vec<OwnedFd>,
    ) -> Result<Vec<OutFd>, String> {
        let mut out = Vec::with_capacity(fds.len());
        for (i, fd) in fds.into_iter().enumerate() {
            let attenuate = approved.get(i).filter(|a| {
                a.class.kind == FdKind::Memfd
                    && a.class.max_rights.contains(bulkhead_policy::Rights::WRITE)
                    && !a.rights.contains(bulkhead_policy::Rights::WRITE)
            });
            if let Some(a) = attenuate {
                let ro = match self.ro_cache.get(&a.class.key) {
                    Some(ro) => ro.clone(),
                    None => {
                        let ro = Arc::new(
                            self.memfd
                                .readonly_copy(fd.as_fd())
                                .map_err(|e| e.to_string())?,
                        );
                        if self.ro_cache.len() >= RO_CACHE {
                            self.ro_cache.clear();
                        }
                        self.ro_cache.insert(a.class.key, ro.clone());
                        ro
                    }
                };
                // The sender's description is closed (with the batch's others, see `bury`);
                // the receiver gets the read-only one.
                self.grave.push(fd);
                out.push(OutFd::Shared(ro));
            } else {
                out.push(OutFd::Own(fd));
            }
        }
        Ok(out)
    }
}
