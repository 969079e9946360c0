//! virtio-blk: a raw disk image as a block device.
pub mod device;
pub mod request;
