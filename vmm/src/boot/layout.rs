//! The guest physical address map: where everything the VMM places in guest memory lives.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page (boot_params)     0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4   0x0000_a000 PDPT     0x0000_b000  PD (1 GiB of 2 MiB pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  end of low RAM (EBDA start)
//! 0x000e_0000  ACPI tables (RSDP first), reserved in the e820 map up to 1 MiB
//! 0x000f_fff0  reset stub (writes the ACPI reset register)
//! 0x0010_0000  kernel (protected-mode part of the bzImage)
//! ...          RAM up to min(memory, 3 GiB); initramfs at its top
//! 0xc000_0000  PCI MMIO window (BARs), up to the IOAPIC
//! 0xfec0_0000  IOAPIC   0xfee0_0000 local APIC
//! 0x1_0000_0000  RAM above 4 GiB, when memory > 3 GiB
//! 0x10_0000_0000 64-bit PCI BAR window (64 GiB; shared-memory BARs)
//! ```

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (the kernel installs its own; a zero-length IDT is loaded).
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (512 entries of 2 MiB: the first GiB identity-mapped).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (bytes, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of the usable RAM below 1 MiB (start of the EBDA on a PC).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables; the RSDP sits at the start so legacy scans of 0xe0000 also find it.
pub const ACPI_START: u64 = 0xe0000;
/// The x86 reset vector (F000:FFF0), where a reset stub lives (see `reset_vector`).
pub const RESET_VECTOR: u64 = 0xffff0;
/// End of the firmware hole below 1 MiB.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap (PCI BARs, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// PCI BAR window (32-bit, non-prefetchable), below the IOAPIC.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
/// Size of the PCI BAR window.
pub const PCI_MMIO_SIZE: u64 = IOAPIC_ADDR - PCI_MMIO_START;
/// 64-bit PCI BAR window (prefetchable; shared-memory BARs): 64 GiB at 64 GiB. Guest RAM
/// above 4 GiB must end below it (60 GiB of RAM at most).
pub const PCI_MMIO64_START: u64 = 64 << 30;
/// Size of the 64-bit PCI BAR window.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// IOAPIC MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// TSS address KVM needs on Intel (three pages below the BIOS ROM area).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// Identity-map page KVM needs on Intel (one page before the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// COM1 I/O base and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's IOAPIC pin.
pub const COM1_IRQ: u32 = 4;
/// The power-management register (ACPI sleep control/status and reset), one byte.
pub const PM_PORT: u16 = 0x600;
/// The generic event device's IOAPIC pin (it raises the ACPI power button).
pub const GED_IRQ: u32 = 5;
/// The 8042 command port: a write of 0xfe there is the legacy reset request.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// PCI configuration mechanism #1 (address port 0xcf8, data ports 0xcfc..0xcff).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;
/// The GSI every PCI INTx pin is routed to by the DSDT's `_PRT` (one shared, level-triggered
/// line; passed-through devices' INTx use it).
pub const PCI_INTX_GSI: u32 = 16;
