//! Devices and the buses they sit on.
pub mod acpi;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod vfio;
pub mod virtio;
