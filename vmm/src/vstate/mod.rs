//! VM state: guest memory, vCPUs, GSI routing, and the exit signal.
pub mod exit;
pub mod irq_routing;
pub mod memory;
pub mod memory_slots;
pub mod vcpu;
