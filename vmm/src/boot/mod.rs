//! Booting Linux: the address map, ACPI tables, e820, the bzImage loader, long-mode setup.
pub mod acpi;
pub mod bzimage;
pub mod e820;
pub mod layout;
pub mod long_mode;
pub mod reset_vector;
