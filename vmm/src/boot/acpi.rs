//! ACPI tables: RSDP → XSDT → FADT (hardware-reduced) → DSDT, and MADT.
//!
//! Only what exists is declared: COM1, the PCI root bridge (config through ports 0xcf8..0xcff,
//! no ECAM, so no MCFG), an ACPI power button raised through a generic event device (GED), and
//! the `_S5_` sleep state. No RTC, no i8042, no VGA, no legacy PIC: the guest kernel probes
//! nothing that is not there.
//!
//! Power management is one byte-wide I/O register (`layout::PM_PORT`): the FADT names it as the
//! sleep control, sleep status and reset register. Writing `SLP_EN | SLP_TYP=5` powers off,
//! writing `RESET_VALUE` reboots (see `devices::acpi::power`).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    ACPI_START, COM1_IRQ, COM1_PORT, GED_IRQ, IOAPIC_ADDR, LAPIC_ADDR, PCI_CONFIG_PORT,
    PCI_MMIO64_SIZE, PCI_MMIO64_START, PCI_MMIO_SIZE, PCI_MMIO_START, PM_PORT, RESET_VECTOR,
};
use crate::vstate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"BLKHD ";
/// The value written to the reset register to reboot.
pub const RESET_VALUE: u8 = 0x01;
/// The sleep type of S5 (soft off) in `_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// FADT IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5). Bit 1 (8042) clear.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved area or guest memory.
    #[error("cannot write ACPI table {0} into guest memory")]
    Write(&'static str),
}

/// Already-serialized AML, so each device can be built in one expression.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn bytes_of(a: &dyn Aml) -> RawAml {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    RawAml(v)
}

fn com1() -> RawAml {
    bytes_of(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                ]),
            ),
        ],
    ))
}

/// `_PRT`: INTA..INTD of every slot on bus 0 go to `PCI_INTX_GSI` (shared, level-triggered).
fn pci_routing() -> RawAml {
    let addrs: Vec<u32> = (0..32u32).map(|slot| (slot << 16) | 0xffff).collect();
    let pins: [u8; 4] = [0, 1, 2, 3];
    let gsi = &super::layout::PCI_INTX_GSI;
    let entries: Vec<aml::Package> = addrs
        .iter()
        .flat_map(|a| {
            pins.iter()
                .map(move |p| aml::Package::new(vec![a, p, &aml::ZERO, gsi]))
        })
        .collect();
    let refs: Vec<&dyn Aml> = entries.iter().map(|e| e as &dyn Aml).collect();
    bytes_of(&aml::Name::new("_PRT".into(), &aml::Package::new(refs)))
}

fn pci0() -> RawAml {
    let pci_mmio_end = (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32;
    let prt = pci_routing();
    bytes_of(&aml::Device::new(
        "PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &prt,
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO_START as u32,
                        pci_mmio_end,
                        None,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::PreFetchable,
                        true,
                        PCI_MMIO64_START,
                        PCI_MMIO64_START + PCI_MMIO64_SIZE - 1,
                        None,
                    ),
                ]),
            ),
        ],
    ))
}

fn power_button() -> RawAml {
    bytes_of(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ))
}

fn ged() -> RawAml {
    bytes_of(&aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true, true, false, false, GED_IRQ,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
            ),
        ],
    ))
}

/// The DSDT body (AML) for the devices this VMM provides.
pub fn dsdt_aml() -> Vec<u8> {
    let (c, p, b, g) = (com1(), pci0(), power_button(), ged());
    let mut bytes = Vec::new();
    aml::Scope::new("\\_SB_".into(), vec![&c, &p, &b, &g]).to_aml_bytes(&mut bytes);
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]))
        .to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt() -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"BHDSDT  ", 1);
    dsdt.append_slice(&dsdt_aml());
    dsdt
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(PM_PORT),
    );
    let mut b = FADTBuilder::new(OEM_ID, *b"BHFACP  ", 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = pm;
    b.sleep_status_reg = pm;
    b.reset_reg = pm;
    b.reset_value = RESET_VALUE;
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"BULKHEAD").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"BHAPIC  ",
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    out
}

/// Writes all tables for `vcpus` CPUs at `layout::ACPI_START`; returns the RSDP address.
pub fn write_acpi_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = ACPI_START + 0x40;
    let mut place = |name: &'static str, bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        let end = addr + bytes.len() as u64;
        if end > RESET_VECTOR {
            return Err(AcpiError::Write(name));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::Write(name))?;
        next = (end + 15) & !15;
        Ok(addr)
    };
    let dsdt_addr = place("DSDT", dsdt().as_slice())?;
    let fadt_addr = place("FACP", &fadt(dsdt_addr))?;
    let madt_addr = place("APIC", &madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, *b"BHXSDT  ", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place("XSDT", &xsdt_bytes)?;
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(|_| AcpiError::Write("RSDP"))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a table at `addr`, checks its length and checksum, returns it.
    fn table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, addr, 36);
        assert_eq!(&head[0..4], sig);
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let t = read(mem, addr, len);
        assert_eq!(sum(&t), 0, "checksum of {}", String::from_utf8_lossy(sig));
        t
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20).unwrap();
        let rsdp_addr = write_acpi_tables(&mem, 3).unwrap();
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&mem, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&mem, u64_at(&xsdt, 44), b"APIC");

        // FADT: hardware-reduced, reset register supported, no RTC/8042/VGA.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        let iapc = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(iapc, IAPC_BOOT_ARCH);
        // Reset register: GAS at 116 (I/O space, port PM_PORT), value at 128.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(&fadt, 120), u64::from(PM_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        // Sleep control register (offset 244) is the same port.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), u64::from(PM_PORT));
        let dsdt = table(&mem, u64_at(&fadt, 140), b"DSDT");

        // MADT: 3 local APICs (type 0) and one IOAPIC (type 1).
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 0, 1]);

        // DSDT declares COM1, PCI0, PWRB, GED0 and _S5_, and no RTC (PNP0B00).
        let body = &dsdt[36..];
        for name in [b"COM1", b"PCI0", b"PWRB", b"GED0", b"_S5_"] {
            assert!(body.windows(4).any(|w| w == name), "{:?}", name);
        }
        let mut rtc = Vec::new();
        aml::EISAName::new("PNP0B00").to_aml_bytes(&mut rtc);
        assert!(!body.windows(rtc.len()).any(|w| w == rtc.as_slice()));
    }
}
