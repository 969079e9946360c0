//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and the interrupt
//! delivery behind it. Each vector has its own GSI and eventfd; the table entry's address/data
//! become that GSI's MSI route. Two ways to deliver:
//!
//! - **emulated devices** (`new`): the VMM raises a vector with `trigger`; each eventfd is bound
//!   with an irqfd once. A masked vector's triggers set its pending bit and fire when it is
//!   unmasked.
//! - **gated** (`new_gated`): something outside the VMM writes the eventfds (VFIO, for a
//!   passed-through device), so masking cannot be done in `trigger`. Instead a vector's irqfd is
//!   bound only while the vector is unmasked (MSI-X enabled, function and entry unmasked).
//!   While it is unbound, writes accumulate in the eventfd: that is the pending bit (the PBA
//!   reads it with a zero-timeout poll), and unmasking delivers it once.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::irq_routing::{IrqRouting, IrqRoutingError};

/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
const ENTRY_MASKED: u32 = 1;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_MASK: u16 = 1 << 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

struct Table {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// Gated delivery: whether each vector's irqfd is bound now. `None`: emulated delivery.
    bound: Option<Vec<bool>>,
}

impl Table {
    fn masked(&self, v: usize) -> bool {
        !self.enabled
            || self.function_masked
            || self
                .entries
                .get(v)
                .is_none_or(|e| e.control & ENTRY_MASKED != 0)
    }
}

/// The body (after ID and next pointer) of an MSI-X capability for `vectors` vectors whose
/// table is at `table_offset` and PBA at `pba_offset` in BAR `bar`, and its writable mask.
pub fn capability(vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&(vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
    body.extend_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
    body.extend_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
    let mut mask = vec![0u8; body.len()];
    mask[1] = 0xc0; // enable + function mask
    (body, mask)
}

/// MSI-X vectors of one device.
pub struct MsixVectors {
    table: Mutex<Table>,
    gsis: Vec<u32>,
    evts: Vec<EventFd>,
    routing: Option<Arc<IrqRouting>>,
}

impl MsixVectors {
    /// `count` vectors, each with a GSI and irqfd in `routing`.
    pub fn new(count: u16, routing: Arc<IrqRouting>) -> Result<Self, IrqRoutingError> {
        let mut gsis = Vec::new();
        let mut evts = Vec::new();
        for _ in 0..count {
            let gsi = routing.allocate_gsi()?;
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|_| IrqRoutingError::Table)?;
            routing.register_irqfd(&evt, gsi)?;
            gsis.push(gsi);
            evts.push(evt);
        }
        Ok(Self::with(count, gsis, evts, Some(routing), false))
    }

    /// `count` vectors whose eventfds someone else writes (VFIO): each gets a GSI, and its
    /// irqfd is bound only while the vector is unmasked (see the module comment).
    pub fn new_gated(count: u16, routing: Arc<IrqRouting>) -> Result<Self, IrqRoutingError> {
        let mut gsis = Vec::new();
        let mut evts = Vec::new();
        for _ in 0..count {
            gsis.push(routing.allocate_gsi()?);
            evts.push(EventFd::new(EFD_NONBLOCK).map_err(|_| IrqRoutingError::Table)?);
        }
        Ok(Self::with(count, gsis, evts, Some(routing), true))
    }

    /// `count` vectors that only write their eventfds (no KVM routes): for tests, which read
    /// the eventfds with `eventfd(v)`.
    pub fn new_unrouted(count: u16) -> std::io::Result<Self> {
        let evts = (0..count)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self::with(
            count,
            vec![0; count as usize],
            evts,
            None,
            false,
        ))
    }

    fn with(
        count: u16,
        gsis: Vec<u32>,
        evts: Vec<EventFd>,
        routing: Option<Arc<IrqRouting>>,
        gated: bool,
    ) -> Self {
        Self {
            table: Mutex::new(Table {
                entries: vec![Entry::default(); count as usize],
                pending: vec![false; count as usize],
                enabled: false,
                function_masked: false,
                bound: gated.then(|| vec![false; count as usize]),
            }),
            gsis,
            evts,
            routing,
        }
    }

    /// Every vector's eventfd, in order (what VFIO is given to signal).
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.evts.iter().collect()
    }

    /// Whether the function mask bit is set.
    pub fn function_masked(&self) -> bool {
        self.lock().function_masked
    }

    /// Number of vectors.
    pub fn count(&self) -> usize {
        self.evts.len()
    }

    /// The eventfd of vector `v`.
    pub fn eventfd(&self, v: usize) -> Option<&EventFd> {
        self.evts.get(v)
    }

    /// Table size in bytes.
    pub fn table_size(&self) -> u64 {
        self.count() as u64 * MSIX_ENTRY_SIZE
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises vector `v` (or marks it pending if masked). Unknown vectors are ignored.
    pub fn trigger(&self, v: u16) {
        let v = usize::from(v);
        let mut t = self.lock();
        if v >= t.entries.len() {
            return;
        }
        if t.masked(v) {
            if let Some(p) = t.pending.get_mut(v) {
                *p = true;
            }
            return;
        }
        drop(t);
        if let Some(e) = self.evts.get(v) {
            if let Err(err) = e.write(1) {
                log::warn!("bulkhead-vmm: MSI-X vector {v}: {err}");
            }
        }
    }

    /// The capability's message-control word was written.
    pub fn set_control(&self, control: u16) {
        let mut t = self.lock();
        t.enabled = control & CONTROL_ENABLE != 0;
        t.function_masked = control & CONTROL_MASK != 0;
        let n = t.entries.len();
        drop(t);
        for v in 0..n {
            self.refresh(v);
        }
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// A read inside the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let t = self.lock();
        let (v, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = t.entries.get(v) else {
            data.fill(0);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = field as usize;
        match bytes.get(start..start + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    /// A write inside the table (4- or 8-byte accesses within one entry).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let (v, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            (offset % MSIX_ENTRY_SIZE) as usize,
        );
        {
            let mut t = self.lock();
            let Some(e) = t.entries.get_mut(v) else {
                return;
            };
            let mut bytes = [0u8; 16];
            for (i, w) in [e.addr_lo, e.addr_hi, e.data, e.control].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            let Some(dst) = bytes.get_mut(field..field + data.len()) else {
                return;
            };
            dst.copy_from_slice(data);
            let w =
                |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
            *e = Entry {
                addr_lo: w(0),
                addr_hi: w(4),
                data: w(8),
                control: w(12),
            };
        }
        self.refresh(v);
    }

    /// A read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let t = self.lock();
        let gated = t.bound.is_some();
        for (i, b) in data.iter_mut().enumerate() {
            let mut byte = 0u8;
            for bit in 0..8 {
                let v = (offset as usize)
                    .saturating_add(i)
                    .saturating_mul(8)
                    .saturating_add(bit);
                let pending = if gated {
                    // Unbound (masked) and written meanwhile.
                    v < t.entries.len() && t.masked(v) && self.evts.get(v).is_some_and(readable)
                } else {
                    t.pending.get(v).copied().unwrap_or(false)
                };
                if pending {
                    byte |= 1 << bit;
                }
            }
            *b = byte;
        }
    }

    /// Gated delivery: binds vector `v`'s irqfd if it is unmasked and unbinds it if masked
    /// (called with its route already updated). An interrupt that arrived while it was
    /// unbound is delivered once through the irqfd.
    fn gate(&self, t: &mut Table, v: usize) {
        let masked = t.masked(v);
        let (Some(bound), Some(routing), Some(gsi), Some(evt)) = (
            t.bound.as_mut(),
            &self.routing,
            self.gsis.get(v),
            self.evts.get(v),
        ) else {
            return;
        };
        let Some(b) = bound.get_mut(v) else {
            return;
        };
        if masked && *b {
            if let Err(e) = routing.vm().unregister_irqfd(evt, *gsi) {
                log::warn!("bulkhead-vmm: MSI-X vector {v}: unbinding irqfd: {e}");
            }
            *b = false;
        } else if !masked && !*b {
            // Take what is pending out of the counter and write it back after binding, so KVM
            // consumes it as an ordinary interrupt (binding alone would inject but leave the
            // count behind).
            let pending = evt.read().is_ok();
            if let Err(e) = routing.register_irqfd(evt, *gsi) {
                log::warn!("bulkhead-vmm: MSI-X vector {v}: binding irqfd: {e}");
                return;
            }
            *b = true;
            if pending {
                let _ = evt.write(1);
            }
        }
    }

    /// Re-routes vector `v` and delivers its pending interrupt if it became unmasked.
    fn refresh(&self, v: usize) {
        let mut t = self.lock();
        let Some(e) = t.entries.get(v).copied() else {
            return;
        };
        if t.bound.is_some() {
            if let (Some(routing), Some(gsi)) = (&self.routing, self.gsis.get(v)) {
                let res = if t.enabled {
                    let addr = u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32);
                    routing.set_msi(*gsi, addr, e.data)
                } else {
                    routing.clear_msi(*gsi)
                };
                if let Err(err) = res {
                    log::warn!("bulkhead-vmm: MSI-X vector {v} route: {err}");
                }
            }
            self.gate(&mut t, v);
            return;
        }
        let masked = t.masked(v);
        let fire = !masked && t.pending.get(v).copied().unwrap_or(false);
        if fire {
            if let Some(p) = t.pending.get_mut(v) {
                *p = false;
            }
        }
        let enabled = t.enabled;
        drop(t);
        if let (Some(routing), Some(gsi)) = (&self.routing, self.gsis.get(v)) {
            let res = if enabled {
                let addr = u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32);
                routing.set_msi(*gsi, addr, e.data)
            } else {
                routing.clear_msi(*gsi)
            };
            if let Err(err) = res {
                log::warn!("bulkhead-vmm: MSI-X vector {v} route: {err}");
            }
        }
        if fire {
            if let Some(evt) = self.evts.get(v) {
                let _ = evt.write(1);
            }
        }
    }
}

/// Whether an eventfd has a non-zero count (without reading it).
fn readable(evt: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_vectors_are_pending_until_unmasked() {
        let m = MsixVectors::new_unrouted(2).unwrap();
        m.trigger(0);
        assert!(
            m.eventfd(0).unwrap().read().is_err(),
            "disabled: nothing fires"
        );
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.set_control(CONTROL_ENABLE);
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        // Unmask entry 0: the pending interrupt fires.
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(m.eventfd(0).unwrap().read().unwrap(), 1);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.trigger(0);
        assert_eq!(m.eventfd(0).unwrap().read().unwrap(), 1);
        // Vector 1 is still masked; bogus vectors and offsets are ignored.
        m.trigger(1);
        m.trigger(99);
        assert!(m.eventfd(1).unwrap().read().is_err());
        m.write_table(0x1000, &[1, 2, 3, 4]);
        m.write_table(14, &[0; 4]);
        let mut d = [0u8; 4];
        m.read_table(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        m.read_table(0x1000, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn capability_layout() {
        let (body, mask) = capability(3, 0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(mask[1], 0xc0);
    }
}
