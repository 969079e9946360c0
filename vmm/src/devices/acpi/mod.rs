//! ACPI platform devices: the power-management register and the power button.
pub mod ged;
pub mod power;
