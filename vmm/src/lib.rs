//! bulkhead-vmm: one KVM virtual machine per process.
//!
//! `vm::Vm` owns guest memory (`vstate::memory`), the vCPUs (`vstate::vcpu`), the port and MMIO
//! buses (`devices::bus`) and the devices: COM1, the ACPI power-management register and power
//! button, and PCI bus 0 with virtio devices behind the one virtio-pci transport. `boot` loads
//! a bzImage with ACPI tables. See docs/vmm.md.

pub mod boot;
pub mod config;
pub mod control;
pub mod devices;
pub mod seccomp;
pub mod vm;
pub mod vstate;
