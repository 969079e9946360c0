//! The virtio-net device (ID 1): queue 0 receives, queue 1 transmits; the config space
//! holds the MAC from the command line, the link status (`VIRTIO_NET_S_LINK_UP` while the
//! link to the net VM is up) and the MTU. The link lives from VMM start (`start_link`), so
//! the status is right before the guest's driver looks; the data worker runs while the
//! guest has the device activated.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net as vn;

use super::header::{bit, MTU, OFFLOADS};
use super::link::{lock, HubAccess, LinkThread, Shared};
use super::worker::NetWorker;
use super::{RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// virtio device type of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// `VIRTIO_RING_F_INDIRECT_DESC` (virtio-queue follows indirect tables).
const RING_INDIRECT_DESC: u64 = 1 << 28;
const QUEUE_SIZES: [u16; 2] = [256, 256];

/// What the device offers. `EVENT_IDX`: the guest kicks only when the worker is about to
/// wait and is interrupted only when its driver asked to be (`queues.rs`); each kick and
/// interrupt is a VM exit or an injection, very dear under nested virtualisation.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1
    | RING_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_MTU)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | OFFLOADS;

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "{s:?} is not a MAC address (six hex bytes with colons)"
        ));
    }
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!(
                "{s:?} is not a MAC address (six hex bytes with colons)"
            ));
        }
        *m = u8::from_str_radix(p, 16)
            .map_err(|_| format!("{s:?} is not a MAC address (six hex bytes with colons)"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(mac)
}

/// The network device.
pub struct Net {
    shared: Arc<Shared>,
    link: Option<LinkThread>,
    worker: Option<NetWorker>,
}

impl Net {
    /// A device with `mac` whose backend is the hub service `service` (`net@net-vm`).
    pub fn new(mac: [u8; 6], service: &str) -> std::io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared::new(service, mac)?),
            link: None,
            worker: None,
        })
    }

    /// Starts keeping the link up through `hub` (at VMM start).
    pub fn start_link(&mut self, hub: Box<dyn HubAccess>) -> std::io::Result<()> {
        self.link = Some(LinkThread::spawn(self.shared.clone(), hub)?);
        Ok(())
    }

    /// The state the threads share (tests look at the link and the counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.shared.mac);
        let status = if self.shared.up.load(Ordering::SeqCst) {
            vn::VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c[10..12].copy_from_slice(&MTU.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn name(&self) -> &str {
        "net"
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn pci_class(&self) -> (u8, u8) {
        (0x02, 0x00) // network controller, Ethernet
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        for q in [RX_QUEUE, TX_QUEUE] {
            if !activation.queues.iter().any(|a| a.index == q) {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        let features = activation.features;
        self.shared.features.store(features, Ordering::SeqCst);
        *lock(&self.shared.interrupt) = Some(activation.interrupt.clone());
        if let Some(l) = lock(&self.shared.link).as_ref() {
            l.set_features(features);
        }
        self.worker =
            Some(NetWorker::spawn(self.shared.clone(), activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
        *lock(&self.shared.interrupt) = None;
        self.shared.features.store(0, Ordering::SeqCst);
        if let Some(l) = lock(&self.shared.link).as_ref() {
            l.set_features(0);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.worker = None;
        self.link = None;
        log::info!("bulkhead-vmm: virtio-net: {}", self.shared.stats.summary());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5254:00:12:34:56",
            "01:00:5e:00:00:01",
            "52:54:00:12:34:zz",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
