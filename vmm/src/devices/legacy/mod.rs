//! Legacy PC devices (only COM1).
pub mod serial;
