//! The ACPI power button: a generic event device (`ACPI0013`) whose interrupt makes the guest
//! run `_EVT`, which notifies `\_SB.PWRB` (0x80, "pressed"). The guest's button driver turns
//! that into a KEY_POWER input event; the guest's init decides to power off.

use vmm_sys_util::eventfd::EventFd;

/// Presses the power button by pulsing the GED's interrupt line (an irqfd on its GSI).
pub struct PowerButton {
    irq: EventFd,
}

impl PowerButton {
    /// A button wired to `irq` (already bound to `layout::GED_IRQ` with an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self { irq }
    }

    /// One press.
    pub fn press(&self) -> std::io::Result<()> {
        log::info!("bulkhead-vmm: pressing the ACPI power button");
        self.irq.write(1)
    }
}
