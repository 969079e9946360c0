//! A host PCI function passed through to the guest over VFIO.
//!
//! Config space: the VMM owns the BARs (the guest sizes and moves them on our bus, never on
//! the host's), the expansion ROM (not offered), the interrupt line (the GSI its INTx is
//! wired to, which the DSDT's `_PRT` also names) and MSI-X's message-control word
//! ([`super::msix`]). Reads of anything else come from the device through VFIO's config region
//! and writes go to it, so the command register's memory, I/O and bus-master bits reach the
//! device (vfio-pci filters what it must), and the MSI capability is followed by [`super::msi`].
//!
//! BARs: a memory BAR whose whole region VFIO lets us mmap becomes a KVM memory slot over that
//! mapping (guest accesses never exit); any other memory BAR is trapped and each access is
//! forwarded with pread/pwrite on the device. A BAR holding the MSI-X table or PBA is always
//! trapped: accesses inside those structures are emulated, the rest is forwarded. I/O BARs are
//! not offered.
//!
//! INTx: an eventfd pair — VFIO signals the trigger and masks the line; KVM's resampling irqfd
//! raises the guest's level-triggered IOAPIC pin and, when the guest EOIs it, signals the
//! resample eventfd, which makes VFIO unmask the line (and fire again if the device still
//! asserts it). INTx is off in VFIO while MSI or MSI-X is on (VFIO allows one interrupt type at
//! a time), and back on when the guest turns them off.

use std::sync::Arc;

use bulkhead_vfio::device::{CONFIG_REGION, INTX_IRQ};
use bulkhead_vfio::Device;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msi::{Msi, CAP_ID_MSI};
use super::msix::{MsixLayout, VfioMsix};
use crate::devices::pci::bar_allocator::BarAllocator;
use crate::devices::pci::config_space::{BarKind, BarMove, PciBar, PciConfigSpace, PciHeader};
use crate::devices::pci::device::{BarMapping, PciDevice};
use crate::devices::pci::msix::MSIX_CAP_ID as CAP_ID_MSIX;
use crate::vstate::irq_routing::IrqRouting;
use crate::vstate::memory_slots::{HostMapping, MemorySlots, SlotHandle};

const PAGE: u64 = 4096;
const BAR0_REG: usize = 4;
const ROM_REG: usize = 12;
const CAP_PTR_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Bound on a capability-list walk (a corrupt list may loop).
const MAX_CAPS: usize = 48;

/// Errors building a passthrough device.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// A VFIO operation on the device failed.
    #[error(transparent)]
    Vfio(#[from] bulkhead_vfio::VfioError),
    /// A BAR cannot be offered to the guest.
    #[error("{bdf} BAR {index}: {detail}")]
    Bar {
        /// The device.
        bdf: bulkhead_vfio::Bdf,
        /// BAR index.
        index: usize,
        /// Why.
        detail: String,
    },
    /// Interrupt wiring failed.
    #[error("{bdf} interrupts: {detail}")]
    Irq {
        /// The device.
        bdf: bulkhead_vfio::Bdf,
        /// Why.
        detail: String,
    },
}

/// The command register's offset in config space, and its memory-space enable bit.
const COMMAND_OFFSET: usize = 4;
const COMMAND_MEMORY: u8 = 1 << 1;

/// One BAR offered to the guest.
struct Bar {
    index: usize,
    mapping: BarMapping,
    host: Option<Arc<HostMapping>>,
    slot: Option<SlotHandle>,
}

/// INTx wiring; the eventfds (and KVM's irqfd on them) stay as long as the device.
struct Intx {
    trigger: EventFd,
    resample: EventFd,
    /// Whether VFIO signals `trigger` now (off while MSI or MSI-X is on).
    active: bool,
}

/// A passed-through PCI function on the guest's bus.
pub struct VfioPciDevice {
    name: String,
    device: Arc<Device>,
    /// A display controller's prefetchable BARs, wiped at VM start and end ([`wipe`]).
    display_bars: Vec<usize>,
    /// Only the BAR registers of this header are used: sizing and placement semantics.
    bar_regs: PciConfigSpace,
    bars: Vec<Bar>,
    slots: Arc<MemorySlots>,
    irq_line: u8,
    intx: Option<Intx>,
    msi: Option<Msi>,
    msix: Option<VfioMsix>,
    /// The guest's memory-space enable (command register bit 1). While it is off, the BARs'
    /// KVM slots are removed: guest accesses then find no device (reads all ones, writes
    /// dropped), as on a real bus, instead of touching a mapping vfio-pci has revoked
    /// (which would fail KVM_RUN).
    mem_decode: bool,
}

fn read_u8(device: &Device, at: usize) -> Result<u8, PassthroughError> {
    let mut b = [0u8; 1];
    device.read_region(CONFIG_REGION, at as u64, &mut b)?;
    Ok(b[0])
}

fn read_u16(device: &Device, at: usize) -> Result<u16, PassthroughError> {
    let mut b = [0u8; 2];
    device.read_region(CONFIG_REGION, at as u64, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// The capability list as (offset, id), in list order, bounded.
fn capabilities(device: &Device) -> Result<Vec<(usize, u8)>, PassthroughError> {
    let status = read_u16(device, 6)?;
    let mut out = Vec::new();
    if status & 0x10 == 0 {
        return Ok(out);
    }
    let mut at = usize::from(read_u8(device, 0x34)? & !3);
    while (0x40..0x100).contains(&at) && out.len() < MAX_CAPS {
        let id = read_u8(device, at)?;
        out.push((at, id));
        at = usize::from(read_u8(device, at + 1)? & !3);
    }
    Ok(out)
}

impl VfioPciDevice {
    /// Offers `device` to the guest: allocates its BARs from `bar_alloc`, maps the mmap-able
    /// ones into KVM slots, wires INTx to GSI `irq_line` and prepares MSI.
    pub fn new(
        device: Arc<Device>,
        bar_alloc: &mut BarAllocator,
        slots: &Arc<MemorySlots>,
        routing: &Arc<IrqRouting>,
        irq_line: u8,
    ) -> Result<Self, PassthroughError> {
        let bdf = device.bdf();
        let id = device.read_config_u32(0)?;
        let class = device.read_config_u32(8)?;
        let mut bar_regs = PciConfigSpace::new(PciHeader {
            vendor: id as u16,
            device: (id >> 16) as u16,
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
            revision: class as u8,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let caps = capabilities(&device)?;
        let msix = match caps.iter().find(|(_, id)| *id == CAP_ID_MSIX) {
            Some(&(at, _)) => {
                let layout = MsixLayout::decode(
                    read_u16(&device, at + 2)?,
                    device.read_config_u32(at as u64 + 4)?,
                    device.read_config_u32(at as u64 + 8)?,
                );
                log::info!(
                    "bulkhead-vmm: vfio {bdf}: MSI-X {} vectors, table BAR {} + {:#x}, PBA BAR {} + \
                     {:#x} (emulated)",
                    layout.vectors,
                    layout.table_bar,
                    layout.table_offset,
                    layout.pba_bar,
                    layout.pba_offset
                );
                Some(VfioMsix::new(at, layout, routing.clone()).map_err(|e| {
                    PassthroughError::Irq {
                        bdf,
                        detail: format!("MSI-X vectors: {e}"),
                    }
                })?)
            }
            None => None,
        };
        let mut bars = Vec::new();
        let mut display_bars = Vec::new();
        let mut index = 0usize;
        while index < 6 {
            let raw = device.read_config_u32((0x10 + 4 * index) as u64)?;
            let size = device.region(index as u32).map(|r| r.size).unwrap_or(0);
            if size == 0 {
                index += 1;
                continue;
            }
            let bad = |detail: String| PassthroughError::Bar { bdf, index, detail };
            if raw & 1 == 1 {
                log::warn!("bulkhead-vmm: vfio {bdf}: I/O BAR {index} is not offered");
                index += 1;
                continue;
            }
            if !size.is_power_of_two() || size < 16 {
                return Err(bad(format!("size {size:#x} is not a power of two")));
            }
            let is_64bit = (raw >> 1) & 3 == 2;
            let alloc = size.max(PAGE);
            let addr = if is_64bit {
                bar_alloc
                    .allocate_mmio64(alloc)
                    .or_else(|_| bar_alloc.allocate_mmio32(alloc))
            } else {
                bar_alloc.allocate_mmio32(alloc)
            }
            .map_err(|e| bad(e.to_string()))?;
            let prefetchable = raw & 8 != 0;
            bar_regs
                .add_bar(PciBar {
                    index,
                    addr,
                    size,
                    kind: if is_64bit {
                        BarKind::Mmio64
                    } else {
                        BarKind::Mmio32
                    },
                    prefetchable,
                })
                .map_err(|e| bad(e.to_string()))?;
            if prefetchable && is_display(class) {
                display_bars.push(index);
            }
            let region = device
                .region(index as u32)
                .cloned()
                .ok_or_else(|| bad("no region".into()))?;
            let mappable = size % PAGE == 0
                && region.mmap_areas == [(0, size)]
                && !msix.as_ref().is_some_and(|m| m.uses_bar(index))
                && region.readable;
            let mut bar = Bar {
                index,
                mapping: BarMapping::Trapped,
                host: None,
                slot: None,
            };
            if mappable {
                let len = usize::try_from(size).map_err(|e| bad(e.to_string()))?;
                let host = Arc::new(
                    HostMapping::map_fd_at(&*device, region.offset, len, region.writable)
                        .map_err(|e| bad(e.to_string()))?,
                );
                bar.slot = Some(
                    slots
                        .map(addr, host.clone())
                        .map_err(|e| bad(e.to_string()))?,
                );
                bar.host = Some(host);
                bar.mapping = BarMapping::DeviceMapped;
            }
            log::info!(
                "bulkhead-vmm: vfio {bdf}: BAR {index} {size:#x} bytes at {addr:#x}, {}",
                if mappable {
                    "mapped (KVM slot)"
                } else {
                    "trapped"
                }
            );
            bars.push(bar);
            index += if is_64bit { 2 } else { 1 };
        }

        // Before the guest runs: nothing a previous owner left on the screen reaches it.
        wipe(&device, &display_bars, "at VM start");

        let msi = match caps.iter().find(|(_, id)| *id == CAP_ID_MSI) {
            Some(&(at, _)) => Some(
                Msi::new(at, read_u16(&device, at + 2)?, routing.clone()).map_err(|e| {
                    PassthroughError::Irq {
                        bdf,
                        detail: e.to_string(),
                    }
                })?,
            ),
            None => None,
        };

        let pin = read_u8(&device, 0x3d)?;
        let has_intx = device.irq(INTX_IRQ).is_some_and(|i| i.count > 0);
        let intx = if pin != 0 && has_intx {
            let irq_err = |detail: String| PassthroughError::Irq { bdf, detail };
            let trigger = EventFd::new(EFD_NONBLOCK).map_err(|e| irq_err(e.to_string()))?;
            let resample = EventFd::new(EFD_NONBLOCK).map_err(|e| irq_err(e.to_string()))?;
            routing
                .vm()
                .register_irqfd_with_resample(&trigger, &resample, u32::from(irq_line))
                .map_err(|e| irq_err(format!("KVM_IRQFD with resample: {e}")))?;
            device.enable_intx(&trigger, &resample)?;
            log::info!("bulkhead-vmm: vfio {bdf}: INTx on GSI {irq_line} (resampled)");
            Some(Intx {
                trigger,
                resample,
                active: true,
            })
        } else {
            None
        };

        Ok(Self {
            name: format!("vfio-{bdf}"),
            device,
            display_bars,
            bar_regs,
            bars,
            slots: slots.clone(),
            irq_line: if intx.is_some() { irq_line } else { 0xff },
            intx,
            msi,
            msix,
            mem_decode: true,
        })
    }

    /// Follows the guest's memory-space enable: removes the mapped BARs' slots when it goes
    /// off, puts them back at the BARs' current addresses when it comes on again.
    fn set_mem_decode(&mut self, on: bool) {
        if on == self.mem_decode {
            return;
        }
        self.mem_decode = on;
        for bar in self.bars.iter_mut() {
            if bar.mapping != BarMapping::DeviceMapped {
                continue;
            }
            if !on {
                bar.slot = None;
                continue;
            }
            let Some(host) = bar.host.clone() else {
                continue;
            };
            let Some(addr) = self
                .bar_regs
                .bars()
                .find(|b| b.index == bar.index)
                .map(|b| b.addr)
            else {
                continue;
            };
            match self.slots.map(addr, host) {
                Ok(slot) => bar.slot = Some(slot),
                Err(e) => log::warn!(
                    "bulkhead-vmm: {}: BAR {} slot at {addr:#x}: {e}",
                    self.name,
                    bar.index
                ),
            }
        }
        log::info!(
            "bulkhead-vmm: vfio {}: memory decoding {}",
            self.device.bdf(),
            if on {
                "on: mapped BARs back in place"
            } else {
                "off: mapped BARs removed"
            }
        );
    }

    /// Stops VFIO signalling INTx (before MSI or MSI-X is enabled: one type at a time).
    fn intx_off(&mut self) {
        if let Some(intx) = self.intx.as_mut().filter(|i| i.active) {
            match self.device.disable_irq(INTX_IRQ) {
                Ok(()) => intx.active = false,
                Err(e) => log::warn!("bulkhead-vmm: {}: disabling INTx: {e}", self.name),
            }
        }
    }

    /// Gives INTx back to VFIO once neither MSI nor MSI-X is on.
    fn intx_on_if_idle(&mut self) {
        let msi_on = self.msi.as_ref().is_some_and(|m| m.enabled());
        let msix_on = self.msix.as_ref().is_some_and(|m| m.device_enabled());
        if msi_on || msix_on {
            return;
        }
        if let Some(intx) = self.intx.as_mut().filter(|i| !i.active) {
            match self.device.enable_intx(&intx.trigger, &intx.resample) {
                Ok(()) => intx.active = true,
                Err(e) => log::warn!("bulkhead-vmm: {}: re-enabling INTx: {e}", self.name),
            }
        }
    }

    /// A guest write to the MSI-X capability: emulated; VFIO follows the enable bit.
    fn msix_config_write(&mut self, at: usize, data: &[u8]) {
        let Some(msix) = self.msix.as_mut() else {
            return;
        };
        if !msix.config_write(at, data) {
            return;
        }
        let enabling = msix.enabled();
        if enabling {
            self.intx_off();
        }
        if let Some(msix) = self.msix.as_mut() {
            if let Err(e) = msix.sync_device(&self.device) {
                log::warn!("bulkhead-vmm: {}: {e}", self.name);
            }
        }
        if !enabling {
            self.intx_on_if_idle();
        }
    }

    /// A guest write of `data` at `at` that touched the MSI capability (already written to
    /// VFIO's config).
    fn msi_config_write(&mut self, at: usize, data: &[u8]) {
        let Some(msi) = self.msi.as_mut() else {
            return;
        };
        if msi.config_write(at, data) == Some(true) && !msi.enabled() {
            self.intx_off();
        }
        if let Some(msi) = self.msi.as_mut() {
            if let Err(e) = msi.update(&self.device) {
                log::warn!("bulkhead-vmm: {}: MSI: {e}", self.name);
            }
        }
        self.intx_on_if_idle();
    }

    /// The VFIO device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Whether INTx is wired.
    pub fn has_intx(&self) -> bool {
        self.intx.is_some()
    }

    /// Stops the device's interrupts and resets it if it can be (VM end).
    pub fn shutdown(&mut self) {
        let bdf = self.device.bdf();
        if let Some(msi) = self.msi.as_mut() {
            msi.disable(&self.device);
        }
        if let Some(msix) = self.msix.as_mut() {
            msix.disable(&self.device);
        }
        if self.intx.take().is_some_and(|i| i.active) {
            if let Err(e) = self.device.disable_irq(INTX_IRQ) {
                log::warn!("bulkhead-vmm: vfio {bdf}: disabling INTx: {e}");
            }
        }
        if self.device.can_reset() {
            match self.device.reset() {
                Ok(()) => log::info!("bulkhead-vmm: vfio {bdf}: reset at VM end"),
                Err(e) => log::warn!("bulkhead-vmm: vfio {bdf}: reset at VM end failed: {e}"),
            }
        } else {
            log::info!("bulkhead-vmm: vfio {bdf}: no reset method; not reset at VM end");
        }
        // A reset keeps video memory (real GPUs' and bochs-display's alike).
        wipe(&self.device, &self.display_bars, "at VM end");
    }
}

/// Whether a PCI class register (class, subclass, prog-if, revision) is a display
/// controller's (base class 0x03: VGA, XGA, 3D, other).
fn is_display(class_reg: u32) -> bool {
    class_reg >> 24 == 0x03
}

/// Writes zeros over a display controller's memory that the VMM wipes between owners: its
/// prefetchable memory BARs `bars` (framebuffer, video memory; register BARs are never
/// written: zeros there could make a device do anything), and says so (or why not) in the
/// VMM's log.
fn wipe(device: &Device, bars: &[usize], when: &str) {
    let bdf = device.bdf();
    for &index in bars {
        match device.zero_region(index as u32) {
            Ok(n) => log::info!(
                "bulkhead-vmm: vfio {bdf}: BAR {index} wiped {when} ({n:#x} bytes of display memory)"
            ),
            Err(e) => log::warn!("bulkhead-vmm: vfio {bdf}: BAR {index} not wiped {when}: {e}"),
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        let mut v = match reg {
            r if (BAR0_REG..BAR0_REG + 6).contains(&r) => self.bar_regs.read_reg(r),
            ROM_REG => 0,
            r if r < 64 => self
                .device
                .read_config_u32((r * 4) as u64)
                .unwrap_or(0xffff_ffff),
            _ => 0xffff_ffff,
        };
        if reg == INTERRUPT_REG {
            v = (v & !0xff) | u32::from(self.irq_line);
        }
        if let Some(msix) = &self.msix {
            v = msix.patch_config_read(reg, v);
        }
        if let Some(msi) = &self.msi {
            v = msi.patch_config_read(reg, v);
        }
        v
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) -> Option<BarMove> {
        match reg {
            r if (BAR0_REG..BAR0_REG + 6).contains(&r) => self.bar_regs.write(r, offset, data),
            // No ROM; the interrupt line is ours (fixed wiring); the capability pointer is
            // read-only anyway.
            ROM_REG | INTERRUPT_REG | CAP_PTR_REG => None,
            r if r < 64 => {
                let at = r * 4 + offset;
                if offset + data.len() > 4 {
                    return None;
                }
                if self.msix.as_ref().is_some_and(|m| m.covers(at, data.len())) {
                    self.msix_config_write(at, data);
                    return None;
                }
                if let Err(e) = self.device.write_region(CONFIG_REGION, at as u64, data) {
                    log::warn!("bulkhead-vmm: {}: config write at {at:#x}: {e}", self.name);
                }
                if let Some(cmd) = COMMAND_OFFSET.checked_sub(at).and_then(|i| data.get(i)) {
                    self.set_mem_decode(cmd & COMMAND_MEMORY != 0);
                }
                if self.msi.as_ref().is_some_and(|m| m.covers(at, data.len())) {
                    self.msi_config_write(at, data);
                }
                None
            }
            _ => None,
        }
    }

    fn bars(&self) -> Vec<(PciBar, BarMapping)> {
        self.bar_regs
            .bars()
            .filter_map(|b| {
                self.bars
                    .iter()
                    .find(|x| x.index == b.index)
                    .map(|x| (*b, x.mapping))
            })
            .collect()
    }

    fn bar_read(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        if let Some(msix) = &self.msix {
            if let Some(hit) = msix.hit(index, offset, data.len()) {
                msix.read(hit, data);
                return;
            }
        }
        if let Err(e) = self.device.read_region(index as u32, offset, data) {
            log::debug!("bulkhead-vmm: {}: BAR {index} read: {e}", self.name);
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
        if let Some(msix) = &self.msix {
            if let Some(hit) = msix.hit(index, offset, data.len()) {
                msix.write(hit, data);
                return;
            }
        }
        if let Err(e) = self.device.write_region(index as u32, offset, data) {
            log::debug!("bulkhead-vmm: {}: BAR {index} write: {e}", self.name);
        }
    }

    fn bar_moved(&mut self, mv: &BarMove) -> Result<(), String> {
        let Some(bar) = self.bars.iter_mut().find(|b| b.index == mv.index) else {
            return Ok(());
        };
        if bar.mapping != BarMapping::DeviceMapped {
            return Ok(());
        }
        // Remove the old slot before mapping the new one (they may overlap). While memory
        // decoding is off the BAR has no slot; it gets one at its new place when it comes on.
        bar.slot = None;
        if !self.mem_decode {
            return Ok(());
        }
        if let Some(host) = bar.host.clone() {
            bar.slot = Some(
                self.slots
                    .map(mv.new, host)
                    .map_err(|e| format!("{}: BAR {} slot: {e}", self.name, mv.index))?,
            );
        }
        Ok(())
    }
}
