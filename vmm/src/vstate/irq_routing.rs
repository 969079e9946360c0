//! The VM's GSI routing table: the default IOAPIC/PIC pins plus one MSI route per MSI-X vector.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so this keeps the full set and re-sends it on
//! every change. Devices get GSIs above the IOAPIC pins from `allocate_gsi`, bind an eventfd to
//! each with `register_irqfd`, and point the GSI at an MSI address/data pair with `set_msi`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout::IOAPIC_PINS;

/// The most GSIs handed out (KVM allows 4096 routes).
const MAX_GSI: u32 = 1024;

/// Errors from the routing table.
#[derive(Debug, thiserror::Error)]
pub enum IrqRoutingError {
    /// No GSI numbers left.
    #[error("out of GSIs")]
    Exhausted,
    /// KVM refused the table.
    #[error("KVM_SET_GSI_ROUTING failed: {0}")]
    SetRouting(kvm_ioctls::Error),
    /// KVM refused an irqfd.
    #[error("KVM_IRQFD failed: {0}")]
    Irqfd(kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("routing table allocation failed")]
    Table,
}

struct State {
    next_gsi: u32,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// The routing table of one VM (shared by every device that raises MSIs).
pub struct IrqRouting {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouting {
    /// A table with only the default pins; MSI GSIs start after the IOAPIC pins.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(State {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            }),
        }
    }

    /// The VM these routes belong to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// A fresh GSI for an MSI route.
    pub fn allocate_gsi(&self) -> Result<u32, IrqRoutingError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.next_gsi >= MAX_GSI {
            return Err(IrqRoutingError::Exhausted);
        }
        let gsi = st.next_gsi;
        st.next_gsi += 1;
        Ok(gsi)
    }

    /// Makes `evt` raise `gsi` when written.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), IrqRoutingError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(IrqRoutingError::Irqfd)
    }

    /// Points `gsi` at an MSI message (x86 address + data).
    pub fn set_msi(&self, gsi: u32, address: u64, data: u32) -> Result<(), IrqRoutingError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        st.msi.insert(gsi, (address, data));
        self.commit(&st)
    }

    /// Removes the MSI route of `gsi` (writes to its irqfd then do nothing).
    pub fn clear_msi(&self, gsi: u32) -> Result<(), IrqRoutingError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.msi.remove(&gsi).is_some() {
            self.commit(&st)?;
        }
        Ok(())
    }

    fn entries(st: &State) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for pin in 0..IOAPIC_PINS {
            if pin < 16 && pin != 2 {
                let (chip, p) = if pin < 8 {
                    (KVM_IRQCHIP_PIC_MASTER, pin)
                } else {
                    (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
                };
                v.push(irqchip_entry(pin, chip, p));
            }
            v.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for (gsi, (addr, data)) in &st.msi {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = *addr as u32;
            e.u.msi.address_hi = (*addr >> 32) as u32;
            e.u.msi.data = *data;
            v.push(e);
        }
        v
    }

    fn commit(&self, st: &State) -> Result<(), IrqRoutingError> {
        let table =
            KvmIrqRouting::from_entries(&Self::entries(st)).map_err(|_| IrqRoutingError::Table)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(IrqRoutingError::SetRouting)
    }
}
