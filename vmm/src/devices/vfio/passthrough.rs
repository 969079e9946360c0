//! A host PCI function passed through to the guest over VFIO.
//!
//! Config space: the VMM owns the BARs (the guest sizes and moves them on our bus, never on
//! the host's), the expansion ROM (not offered), the interrupt line (the GSI its INTx is
//! wired to, which the DSDT's `_PRT` also names) and the capability list (MSI-X is hidden: it is not emulated). Reads of anything
//! else come from the device through VFIO's config region and writes go to it, so the command
//! register's memory, I/O and bus-master bits reach the device (vfio-pci filters what it must),
//! and the MSI capability is followed by [`super::msi`].
//!
//! BARs: a memory BAR whose whole region VFIO lets us mmap becomes a KVM memory slot over that
//! mapping (guest accesses never exit); any other memory BAR is trapped and each access is
//! forwarded with pread/pwrite on the device. I/O BARs are not offered.
//!
//! INTx: an eventfd pair — VFIO signals the trigger and masks the line; KVM's resampling irqfd
//! raises the guest's level-triggered IOAPIC pin and, when the guest EOIs it, signals the
//! resample eventfd, which makes VFIO unmask the line (and fire again if the device still
//! asserts it).

use std::sync::Arc;

use bulkhead_vfio::device::{CONFIG_REGION, INTX_IRQ};
use bulkhead_vfio::Device;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msi::{Msi, CAP_ID_MSI};
use crate::devices::pci::bar_allocator::BarAllocator;
use crate::devices::pci::config_space::{BarKind, BarMove, PciBar, PciConfigSpace, PciHeader};
use crate::devices::pci::device::{BarMapping, PciDevice};
use crate::vstate::irq_routing::IrqRouting;
use crate::vstate::memory_slots::{HostMapping, MemorySlots, SlotHandle};

const PAGE: u64 = 4096;
const BAR0_REG: usize = 4;
const ROM_REG: usize = 12;
const CAP_PTR_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
const CAP_ID_MSIX: u8 = 0x11;
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

/// One BAR offered to the guest.
struct Bar {
    index: usize,
    mapping: BarMapping,
    host: Option<Arc<HostMapping>>,
    slot: Option<SlotHandle>,
}

/// INTx wiring; the eventfds stay open as long as the device.
struct Intx {
    _trigger: EventFd,
    _resample: EventFd,
}

/// A passed-through PCI function on the guest's bus.
pub struct VfioPciDevice {
    name: String,
    device: Arc<Device>,
    /// Only the BAR registers of this header are used: sizing and placement semantics.
    bar_regs: PciConfigSpace,
    bars: Vec<Bar>,
    slots: Arc<MemorySlots>,
    irq_line: u8,
    intx: Option<Intx>,
    msi: Option<Msi>,
    /// (byte offset of a "next capability" pointer, the value the guest sees there).
    cap_patches: Vec<(usize, u8)>,
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

/// Next-pointer overrides that unlink every capability with an id in `hide`.
fn unlink(caps: &[(usize, u8)], hide: &[u8]) -> Vec<(usize, u8)> {
    let mut patches = Vec::new();
    // The pointer that leads to the next kept capability: 0x34, then each kept one's next.
    let mut prev_ptr = 0x34usize;
    let mut changed = false;
    for &(at, id) in caps {
        if hide.contains(&id) {
            changed = true;
            continue;
        }
        if changed {
            patches.push((prev_ptr, at as u8));
        }
        changed = false;
        prev_ptr = at + 1;
    }
    if changed {
        patches.push((prev_ptr, 0));
    }
    patches
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
        let msix_bar = match caps.iter().find(|(_, id)| *id == CAP_ID_MSIX) {
            Some(&(at, _)) => {
                log::warn!(
                    "bulkhead-vmm: vfio {bdf}: MSI-X is not emulated; its capability is hidden \
                     from the guest (drivers fall back to MSI or INTx)"
                );
                Some((device.read_config_u32(at as u64 + 4)? & 7) as usize)
            }
            None => None,
        };
        let mut bars = Vec::new();
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
                    prefetchable: raw & 8 != 0,
                })
                .map_err(|e| bad(e.to_string()))?;
            let region = device
                .region(index as u32)
                .cloned()
                .ok_or_else(|| bad("no region".into()))?;
            let mappable = size % PAGE == 0
                && region.mmap_areas == [(0, size)]
                && msix_bar != Some(index)
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
                _trigger: trigger,
                _resample: resample,
            })
        } else {
            None
        };

        Ok(Self {
            name: format!("vfio-{bdf}"),
            device,
            bar_regs,
            bars,
            slots: slots.clone(),
            irq_line: if intx.is_some() { irq_line } else { 0xff },
            intx,
            msi,
            cap_patches: unlink(&caps, &[CAP_ID_MSIX]),
        })
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
        if self.intx.take().is_some() {
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
        if reg == CAP_PTR_REG || reg >= 16 {
            for &(at, val) in &self.cap_patches {
                if at / 4 == reg {
                    let shift = (at % 4) * 8;
                    v = (v & !(0xff << shift)) | (u32::from(val) << shift);
                }
            }
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
                if let Err(e) = self.device.write_region(CONFIG_REGION, at as u64, data) {
                    log::warn!("bulkhead-vmm: {}: config write at {at:#x}: {e}", self.name);
                }
                if let Some(msi) = self.msi.as_mut() {
                    if msi.covers(at, data.len()) {
                        if let Err(e) = msi.update(&self.device) {
                            log::warn!("bulkhead-vmm: {}: MSI: {e}", self.name);
                        }
                    }
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
        if let Err(e) = self.device.read_region(index as u32, offset, data) {
            log::debug!("bulkhead-vmm: {}: BAR {index} read: {e}", self.name);
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, index: usize, offset: u64, data: &[u8]) {
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
        // Remove the old slot before mapping the new one (they may overlap).
        bar.slot = None;
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

#[cfg(test)]
mod tests {
    use super::unlink;

    #[test]
    fn hiding_capabilities_relinks_the_list() {
        // 0x40 PM -> 0x50 MSI-X -> 0x60 MSI
        let caps = [(0x40, 0x01), (0x50, 0x11), (0x60, 0x05)];
        assert_eq!(unlink(&caps, &[0x11]), vec![(0x41, 0x60)]);
        // MSI-X first and last.
        assert_eq!(
            unlink(&[(0x40, 0x11), (0x50, 0x05)], &[0x11]),
            vec![(0x34, 0x50)]
        );
        assert_eq!(
            unlink(&[(0x40, 0x05), (0x50, 0x11)], &[0x11]),
            vec![(0x41, 0)]
        );
        assert_eq!(unlink(&[(0x40, 0x11)], &[0x11]), vec![(0x34, 0)]);
        assert!(unlink(&caps, &[]).is_empty());
    }
}
