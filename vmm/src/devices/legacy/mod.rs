//! Legacy PC devices (only COM1) and the host terminal behind it.
pub mod serial;
pub mod serial_out;
pub mod terminal;
