//! virtio-rng: an entropy source.
pub mod device;
