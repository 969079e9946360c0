//! The MSI-X capability of a passed-through function.
//!
//! vfio-pci does not let user space program the device's real vector table (the host kernel owns
//! it and points every vector at a host interrupt that signals an eventfd), so the VMM emulates
//! what the guest sees, as cloud-hypervisor and QEMU do:
//!
//! - the capability's message-control word: its enable and function-mask bits are kept here,
//!   the table size comes from the device; guest writes to the capability never reach VFIO;
//! - the vector table and the pending-bit array: the BAR(s) holding them are trapped, and
//!   accesses inside them are answered by [`MsixVectors`] in gated mode (each vector's address
//!   and data become a KVM MSI route; a vector's irqfd is bound only while it is unmasked);
//!   accesses elsewhere in those BARs go to the device;
//! - enabling: when the guest sets MSI-X enable, VFIO gets one eventfd per vector
//!   (`VFIO_DEVICE_SET_IRQS`), the same eventfds KVM's irqfds listen on, so an interrupt goes
//!   device → host kernel → eventfd → KVM → guest without the VMM running. Clearing the enable
//!   bit turns MSI-X off in VFIO.

use std::sync::Arc;

use bulkhead_vfio::device::MSIX_IRQ;
use bulkhead_vfio::Device;

use crate::devices::pci::msix::{MsixVectors, MSIX_ENTRY_SIZE};
use crate::vstate::irq_routing::{IrqRouting, IrqRoutingError};

/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_MASK: u16 = 1 << 14;
/// Message control: table size minus one.
const CONTROL_TABLE_SIZE: u16 = 0x07ff;

/// Where the capability says the table and PBA are, from its three registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Number of vectors.
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: usize,
    /// Byte offset of the table in that BAR.
    pub table_offset: u64,
    /// BAR holding the pending-bit array.
    pub pba_bar: usize,
    /// Byte offset of the PBA in that BAR.
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Decodes message control, the table register and the PBA register.
    pub fn decode(control: u16, table: u32, pba: u32) -> Self {
        Self {
            vectors: (control & CONTROL_TABLE_SIZE) + 1,
            table_bar: (table & 7) as usize,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as usize,
            pba_offset: u64::from(pba & !7),
        }
    }

    /// Bytes of the table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }

    /// Bytes of the PBA (whole quadwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// Which part of the MSI-X structures a BAR access hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixHit {
    /// The vector table, at this offset into it.
    Table(u64),
    /// The pending-bit array, at this offset into it.
    Pba(u64),
}

/// MSI-X state of one passed-through function.
pub struct VfioMsix {
    cap: usize,
    layout: MsixLayout,
    /// The guest's enable and function-mask bits.
    control: u16,
    vectors: MsixVectors,
    device_enabled: bool,
}

impl VfioMsix {
    /// The capability at config byte `cap` with the given layout; vectors routed in `routing`.
    pub fn new(
        cap: usize,
        layout: MsixLayout,
        routing: Arc<IrqRouting>,
    ) -> Result<Self, IrqRoutingError> {
        Ok(Self::with(
            cap,
            layout,
            MsixVectors::new_gated(layout.vectors, routing)?,
        ))
    }

    /// The same over already-built vectors (tests use unrouted ones).
    pub fn with(cap: usize, layout: MsixLayout, vectors: MsixVectors) -> Self {
        Self {
            cap,
            layout,
            control: 0,
            vectors,
            device_enabled: false,
        }
    }

    /// The layout.
    pub fn layout(&self) -> &MsixLayout {
        &self.layout
    }

    /// The vectors.
    pub fn vectors(&self) -> &MsixVectors {
        &self.vectors
    }

    /// Whether the guest has MSI-X enabled.
    pub fn enabled(&self) -> bool {
        self.control & CONTROL_ENABLE != 0
    }

    /// Whether a config access of `len` bytes at byte `at` touches the capability (12 bytes).
    pub fn covers(&self, at: usize, len: usize) -> bool {
        at < self.cap + 12 && at + len > self.cap
    }

    /// The message-control word the guest sees.
    pub fn control(&self) -> u16 {
        (self.layout.vectors - 1) & CONTROL_TABLE_SIZE | self.control
    }

    /// Patches the config dword `reg` as read from the device with the emulated control word.
    pub fn patch_config_read(&self, reg: usize, value: u32) -> u32 {
        // Capabilities are dword-aligned: the capability's first dword is ID, next, control.
        if reg * 4 == self.cap {
            (value & 0xffff) | (u32::from(self.control()) << 16)
        } else {
            value
        }
    }

    /// A guest write of `data` at config byte `at` (inside the capability). Only the upper
    /// byte of message control is writable; returns whether VFIO must change state (then call
    /// [`Self::sync_device`]).
    pub fn config_write(&mut self, at: usize, data: &[u8]) -> bool {
        let hi = self.cap + 3;
        if at > hi || at + data.len() <= hi {
            return false;
        }
        let Some(byte) = data.get(hi - at) else {
            return false;
        };
        self.control = u16::from(*byte & 0xc0) << 8;
        self.vectors.set_control(self.control);
        self.enabled() != self.device_enabled
    }

    /// Makes VFIO follow the guest's enable bit: one eventfd per vector when enabled, MSI-X off
    /// when not.
    pub fn sync_device(&mut self, device: &Device) -> Result<(), String> {
        if self.enabled() && !self.device_enabled {
            device
                .enable_msix(&self.vectors.eventfds())
                .map_err(|e| format!("enabling MSI-X: {e}"))?;
            self.device_enabled = true;
            log::info!(
                "bulkhead-vmm: vfio {}: MSI-X enabled ({} vectors{})",
                device.bdf(),
                self.layout.vectors,
                if self.control & CONTROL_MASK != 0 {
                    ", function masked"
                } else {
                    ""
                }
            );
        } else if !self.enabled() && self.device_enabled {
            self.disable(device);
        }
        Ok(())
    }

    /// Turns MSI-X off in VFIO (guest disabled it, or VM end).
    pub fn disable(&mut self, device: &Device) {
        if self.device_enabled {
            self.device_enabled = false;
            match device.disable_irq(MSIX_IRQ) {
                Ok(()) => log::info!("bulkhead-vmm: vfio {}: MSI-X disabled", device.bdf()),
                Err(e) => log::warn!("bulkhead-vmm: vfio {}: disabling MSI-X: {e}", device.bdf()),
            }
        }
    }

    /// Whether VFIO has MSI-X on.
    pub fn device_enabled(&self) -> bool {
        self.device_enabled
    }

    /// What an access of `len` bytes at `offset` of BAR `bar` hits, if anything. An access
    /// that straddles the table's or PBA's edge is treated as outside (forwarded).
    pub fn hit(&self, bar: usize, offset: u64, len: usize) -> Option<MsixHit> {
        let l = &self.layout;
        let end = offset.checked_add(len as u64)?;
        if bar == l.table_bar && offset >= l.table_offset && end <= l.table_offset + l.table_len() {
            return Some(MsixHit::Table(offset - l.table_offset));
        }
        if bar == l.pba_bar && offset >= l.pba_offset && end <= l.pba_offset + l.pba_len() {
            return Some(MsixHit::Pba(offset - l.pba_offset));
        }
        None
    }

    /// Whether BAR `bar` holds the table or the PBA (it must be trapped).
    pub fn uses_bar(&self, bar: usize) -> bool {
        bar == self.layout.table_bar || bar == self.layout.pba_bar
    }

    /// A guest read of the table or PBA.
    pub fn read(&self, hit: MsixHit, data: &mut [u8]) {
        match hit {
            MsixHit::Table(o) => self.vectors.read_table(o, data),
            MsixHit::Pba(o) => self.vectors.read_pba(o, data),
        }
    }

    /// A guest write to the table (PBA writes are ignored: it is read-only).
    pub fn write(&self, hit: MsixHit, data: &[u8]) {
        if let MsixHit::Table(o) = hit {
            self.vectors.write_table(o, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn layout() -> MsixLayout {
        // virtio-pci in QEMU: 2 vectors, table at BAR 1 + 0, PBA at BAR 1 + 0x800.
        MsixLayout::decode(1, 1, 0x801)
    }

    #[test]
    fn layout_decodes_the_capability_registers() {
        let l = layout();
        assert_eq!(
            l,
            MsixLayout {
                vectors: 2,
                table_bar: 1,
                table_offset: 0,
                pba_bar: 1,
                pba_offset: 0x800
            }
        );
        assert_eq!((l.table_len(), l.pba_len()), (32, 8));
        let big = MsixLayout::decode(0x7ff, 0x2000 | 4, 0x3000 | 5);
        assert_eq!(
            (big.vectors, big.table_len(), big.pba_len()),
            (2048, 32768, 256)
        );
        assert_eq!((big.table_bar, big.pba_bar), (4, 5));
    }

    #[test]
    fn bar_accesses_hit_table_pba_or_neither() {
        let m = VfioMsix::with(0x40, layout(), MsixVectors::new_unrouted(2).unwrap());
        assert_eq!(m.hit(1, 0, 4), Some(MsixHit::Table(0)));
        assert_eq!(m.hit(1, 28, 4), Some(MsixHit::Table(28)));
        assert_eq!(m.hit(1, 30, 4), None, "straddles the table's end");
        assert_eq!(m.hit(1, 32, 4), None, "between table and PBA");
        assert_eq!(m.hit(1, 0x800, 8), Some(MsixHit::Pba(0)));
        assert_eq!(m.hit(1, 0x808, 4), None);
        assert_eq!(m.hit(4, 0, 4), None, "another BAR");
        assert_eq!(m.hit(1, u64::MAX - 1, 4), None, "overflow");
        assert!(m.uses_bar(1) && !m.uses_bar(0));
    }

    #[test]
    fn control_word_is_emulated_and_only_enable_and_mask_are_writable() {
        let mut m = VfioMsix::with(0x40, layout(), MsixVectors::new_unrouted(2).unwrap());
        assert_eq!(m.control(), 1);
        // The dword at the capability: ID 0x11, next 0x50, control from the device (which
        // vfio-pci reports as it likes) replaced by ours.
        assert_eq!(m.patch_config_read(0x10, 0xffff_5011), 0x0001_5011);
        assert_eq!(m.patch_config_read(0x11, 0x1234), 0x1234);
        // A byte write of the upper control byte: enable + mask; table-size bits are ignored.
        assert!(m.config_write(0x43, &[0xff]));
        assert_eq!(m.control(), 0xc001);
        assert!(m.enabled() && m.vectors().function_masked());
        // A 32-bit write of the whole first dword: clears both.
        assert!(!m.config_write(0x40, &[0x11, 0x50, 0x00, 0x00]));
        assert_eq!(m.control(), 1);
        assert!(!m.enabled() && !m.vectors().function_masked());
        // Writes to the table/PBA registers change nothing.
        assert!(!m.config_write(0x44, &[0xff; 4]));
        assert_eq!(m.control(), 1);
        assert!(m.covers(0x4b, 1) && !m.covers(0x4c, 4) && m.covers(0x3e, 4));
    }

    /// A VM with an in-kernel irqchip (needed for irqfds) and its routing table.
    fn routing() -> (Arc<IrqRouting>, Arc<kvm_ioctls::VmFd>) {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        (Arc::new(IrqRouting::new(vm.clone())), vm)
    }

    fn entry(m: &VfioMsix, v: u64, vector: u32, masked: bool) {
        let at = v * MSIX_ENTRY_SIZE;
        m.write(MsixHit::Table(at), &0xfee0_0000u32.to_le_bytes());
        m.write(MsixHit::Table(at + 4), &0u32.to_le_bytes());
        m.write(MsixHit::Table(at + 8), &vector.to_le_bytes());
        m.write(MsixHit::Table(at + 12), &u32::from(masked).to_le_bytes());
    }

    fn pba(m: &VfioMsix) -> u8 {
        let mut b = [0u8; 8];
        m.read(MsixHit::Pba(0), &mut b);
        b[0]
    }

    /// The device's side of the eventfd: what VFIO does when the device raises vector `v`.
    fn device_raises(m: &VfioMsix, v: usize) {
        m.vectors().eventfd(v).unwrap().write(1).unwrap();
    }

    /// Whether the eventfd still holds a count (KVM's irqfd consumes it when bound).
    fn still_pending(m: &VfioMsix, v: usize) -> bool {
        let fd = m.vectors().eventfd(v).unwrap().as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn masked_vectors_keep_device_interrupts_pending_on_real_kvm_irqfds() {
        let (routing, _vm) = routing();
        let mut m = VfioMsix::new(0x40, layout(), routing).unwrap();
        // Not enabled yet: a device interrupt stays in the eventfd and shows in the PBA.
        device_raises(&m, 0);
        assert!(still_pending(&m, 0));
        assert_eq!(pba(&m), 1);
        // Enable with the function masked, program both entries unmasked.
        m.config_write(0x43, &[0xc0]);
        entry(&m, 0, 0x41, false);
        entry(&m, 1, 0x42, false);
        assert_eq!(pba(&m), 1, "the function mask still holds vector 0");
        device_raises(&m, 1);
        assert_eq!(pba(&m), 3);
        // Clear the function mask: both irqfds are bound and KVM takes both interrupts.
        m.config_write(0x43, &[0x80]);
        assert!(!still_pending(&m, 0) && !still_pending(&m, 1));
        assert_eq!(pba(&m), 0);
        // Bound: a new interrupt goes straight to KVM, never pending.
        device_raises(&m, 0);
        assert!(!still_pending(&m, 0));
        // Mask entry 1 alone: its interrupts pend, vector 0's do not.
        m.write(MsixHit::Table(MSIX_ENTRY_SIZE + 12), &1u32.to_le_bytes());
        device_raises(&m, 1);
        device_raises(&m, 0);
        assert_eq!(pba(&m), 2);
        assert!(still_pending(&m, 1) && !still_pending(&m, 0));
        // Unmask it: delivered once.
        m.write(MsixHit::Table(MSIX_ENTRY_SIZE + 12), &0u32.to_le_bytes());
        assert!(!still_pending(&m, 1));
        assert_eq!(pba(&m), 0);
        // PBA writes are ignored; table reads give back what was written.
        m.write(MsixHit::Pba(0), &[0xff; 8]);
        assert_eq!(pba(&m), 0);
        let mut d = [0u8; 4];
        m.read(MsixHit::Table(MSIX_ENTRY_SIZE + 8), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x42);
        // Disabling MSI-X unbinds everything again.
        m.config_write(0x43, &[0]);
        device_raises(&m, 0);
        assert!(still_pending(&m, 0));
        assert_eq!(pba(&m), 1);
    }
}
