//! VM state: guest memory, vCPUs, GSI routing, the exit signal and the stop signals.
pub mod exit;
pub mod irq_routing;
pub mod memory;
pub mod memory_slots;
pub mod stop;
pub mod vcpu;
