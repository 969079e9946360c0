//! A reset stub at the x86 reset vector (physical 0xffff0, inside the reserved firmware hole).
//!
//! There is no BIOS. A hardware-reduced-ACPI Linux guest without `reboot=` on its command line
//! picks the EFI reboot method, finds no EFI, and falls back to jumping to the BIOS reset
//! vector in real mode (`machine_real_restart`). This stub answers that jump by writing the
//! ACPI reset value to the PM register, so the VMM sees a reboot instead of a guest spinning
//! through zeroed memory.

use vm_memory::{Bytes, GuestAddress};

use super::acpi::RESET_VALUE;
use super::layout::{PM_PORT, RESET_VECTOR};
use crate::vstate::memory::GuestMemoryMmap;

/// `mov dx, PM_PORT` ; `mov al, RESET_VALUE` ; `out dx, al` ; `cli` ; `hlt` ; `jmp $-2`.
pub fn stub() -> [u8; 11] {
    let p = PM_PORT.to_le_bytes();
    [
        0xba,
        p[0],
        p[1],
        0xb0,
        RESET_VALUE,
        0xee,
        0xfa,
        0xf4,
        0xeb,
        0xfd,
        0x90,
    ]
}

/// Writes the stub at the reset vector.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&stub(), GuestAddress(RESET_VECTOR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_fits_below_1_mib() {
        assert!(RESET_VECTOR + stub().len() as u64 <= super::super::layout::HIMEM_START);
        let mem = crate::vstate::memory::create_guest_memory(16 << 20).unwrap();
        write_reset_stub(&mem).unwrap();
        let b: u8 = mem.read_obj(GuestAddress(RESET_VECTOR + 4)).unwrap();
        assert_eq!(b, RESET_VALUE);
    }
}
