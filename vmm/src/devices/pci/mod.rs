//! PCI: bus 0, configuration space, BAR allocation, MSI-X.
pub mod bar_allocator;
pub mod bus;
pub mod config_space;
pub mod device;
pub mod host_bridge;
pub mod msix;
