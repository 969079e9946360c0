//! The device's per-VM limits and how long it waits on a peer: settings both the state and
//! the socket registry read, kept apart so the registry does not depend on the state.

use std::time::Duration;

/// Per-VM limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WlLimits {
    /// Live vfds (guest and host ids together).
    pub max_vfds: usize,
    /// Bytes of shared memory mapped at once.
    pub max_shm_bytes: u64,
    /// Shared-memory vfds at once (each costs one KVM memory slot).
    pub max_shm_count: usize,
}

impl Default for WlLimits {
    fn default() -> Self {
        Self {
            max_vfds: 1024,
            max_shm_bytes: 1 << 30,
            max_shm_count: 256,
        }
    }
}

/// How long a VFD_SEND waits for room when its peer (the hub, a host socket, a pipe) is
/// not reading, before the guest gets `RESP_OUT_OF_MEMORY` (nothing sent) or `RESP_ERR`
/// (a stream cut part-way); also how long NEW_CTX / NEW_CTX_NAMED waits for room in a
/// listening socket's full backlog before the guest gets `RESP_ERR`. The device worker is
/// never held longer than this.
pub const DEFAULT_SEND_WAIT: Duration = Duration::from_millis(500);
