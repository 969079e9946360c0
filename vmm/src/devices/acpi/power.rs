//! The ACPI power-management register (one byte at `layout::PM_PORT`): the FADT's sleep
//! control/status register and reset register. `SLP_EN | SLP_TYP(5)` is power-off, the reset
//! value is reboot. Also catches the legacy 8042 reset (0xfe written to port 0x64).

use std::sync::Arc;

use crate::boot::acpi::{RESET_VALUE, S5_SLEEP_TYPE};
use crate::devices::bus::BusDevice;
use crate::vstate::exit::{ExitReason, ExitSignal};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const I8042_RESET: u8 = 0xfe;

/// The power-management register.
pub struct PowerDevice {
    exit: Arc<ExitSignal>,
}

impl PowerDevice {
    /// A register that reports power-off and reboot through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; the guest does not wait on it for S5.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            self.exit.request(ExitReason::Poweroff);
        } else if v == RESET_VALUE {
            self.exit.request(ExitReason::Reboot);
        } else {
            log::debug!("bulkhead-vmm: PM register write {v:#x} ignored");
        }
    }
}

/// The 8042 command port, only for its reset command.
pub struct I8042Reset {
    exit: Arc<ExitSignal>,
}

impl I8042Reset {
    /// A port that reports a reboot through `exit` on command 0xfe.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042Reset {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if data.first() == Some(&I8042_RESET) {
            self.exit.request(ExitReason::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_is_poweroff_and_reset_value_is_reboot() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = PowerDevice::new(exit.clone());
        pm.write(0, 0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN: nothing
        assert_eq!(exit.reason(), None);
        pm.write(0, 0, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::Poweroff));

        let exit = Arc::new(ExitSignal::new().unwrap());
        PowerDevice::new(exit.clone()).write(0, 0, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));

        let exit = Arc::new(ExitSignal::new().unwrap());
        I8042Reset::new(exit.clone()).write(0, 0, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reboot));
    }
}
