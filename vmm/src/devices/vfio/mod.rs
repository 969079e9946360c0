//! PCI passthrough: a host PCI function (bound to vfio-pci on the host) on the guest's PCI bus.
//!
//! - [`passthrough`]: the PCI device: BARs (KVM memory slots over the device's mmap-able
//!   regions, trapped and forwarded otherwise), config space (BARs, ROM, interrupt line and
//!   MSI-X control emulated, everything else passed through), INTx through a resampling irqfd.
//! - [`msi`]: the MSI capability: enabling it in the guest enables it on the device and routes
//!   its vector to the guest through a KVM MSI route and an irqfd.
//! - [`msix`]: the MSI-X capability, table and PBA, emulated (vfio-pci owns the real table);
//!   each vector an eventfd VFIO signals and KVM's irqfd delivers while the vector is unmasked.
//! - [`attach`]: one VFIO container per VM (all guest memory mapped for DMA, IOVA = guest
//!   physical address), opened by path or adopted from descriptors the parent passed, the KVM
//!   VFIO pseudo-device, and reset at VM start and end.

pub mod attach;
pub mod msi;
pub mod msix;
pub mod passthrough;
