//! The `virtio_net_hdr_v1` in front of every frame (12 bytes; virtio 1.x always has
//! `num_buffers`) and the offload features that decide which headers are allowed. A header
//! from the guest (TX) or from the net VM (RX) is checked against what the guest's driver
//! negotiated before it is passed on: a frame whose header asks for an offload the other
//! side did not agree to is dropped, never "fixed".

use virtio_bindings::virtio_net as vn;

/// Bytes of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// An Ethernet header.
pub const ETH_HLEN: usize = 14;
/// The MTU the device announces (`VIRTIO_NET_F_MTU`).
pub const MTU: u16 = 1500;
/// The largest frame without GSO: MTU, Ethernet header, one VLAN tag.
pub const MAX_PLAIN_FRAME: usize = MTU as usize + ETH_HLEN + 4;
/// The largest frame with GSO.
pub const MAX_GSO_FRAME: usize = 65535 + ETH_HLEN + 4;

/// A feature bit as a mask.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The offloads this device offers (besides MAC, STATUS, MTU and MRG_RXBUF).
pub const OFFLOADS: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6);

const NEEDS_CSUM: u8 = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const DATA_VALID: u8 = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;
const GSO_NONE: u8 = vn::VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;

/// The header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// Buffers this frame spans (mergeable receive buffers).
    pub num_buffers: u16,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HdrError {
    /// Flags other than the ones this direction may carry.
    #[error("header flags {0:#x}")]
    Flags(u8),
    /// A checksum offload that was not negotiated, or a checksum outside the frame.
    #[error("checksum offload not negotiated or outside the frame")]
    Csum,
    /// A GSO type that was not negotiated, or GSO without a checksum offload or size.
    #[error("GSO type {0:#x} not negotiated or malformed")]
    Gso(u8),
    /// A frame shorter than an Ethernet header, or longer than its kind allows.
    #[error("frame of {0} bytes")]
    Length(usize),
}

impl VnetHdr {
    /// Decodes 12 bytes (little-endian).
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// Encodes to 12 bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    fn check(
        &self,
        frame_len: usize,
        csum_ok: bool,
        tso4_ok: bool,
        tso6_ok: bool,
        allowed_flags: u8,
    ) -> Result<(), HdrError> {
        if self.flags & !allowed_flags != 0 {
            return Err(HdrError::Flags(self.flags));
        }
        if self.flags & NEEDS_CSUM != 0 {
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if !csum_ok || end > frame_len {
                return Err(HdrError::Csum);
            }
        }
        let max = match self.gso_type {
            GSO_NONE => MAX_PLAIN_FRAME,
            GSO_TCPV4 | GSO_TCPV6 => {
                let negotiated = if self.gso_type == GSO_TCPV4 {
                    tso4_ok
                } else {
                    tso6_ok
                };
                if !negotiated
                    || self.flags & NEEDS_CSUM == 0
                    || self.gso_size == 0
                    || usize::from(self.hdr_len) > frame_len
                {
                    return Err(HdrError::Gso(self.gso_type));
                }
                MAX_GSO_FRAME
            }
            other => return Err(HdrError::Gso(other)),
        };
        if !(ETH_HLEN..=max).contains(&frame_len) {
            return Err(HdrError::Length(frame_len));
        }
        Ok(())
    }

    /// A header the guest sent with a `frame_len`-byte frame (TX), checked against the
    /// features its driver accepted: checksum offload needs `CSUM`, TCP segmentation
    /// `HOST_TSO4`/`HOST_TSO6`; nothing else (no UFO, no ECN).
    pub fn check_tx(&self, frame_len: usize, features: u64) -> Result<(), HdrError> {
        let has = |b: u32| features & bit(b) != 0;
        self.check(
            frame_len,
            has(vn::VIRTIO_NET_F_CSUM),
            has(vn::VIRTIO_NET_F_HOST_TSO4),
            has(vn::VIRTIO_NET_F_HOST_TSO6),
            NEEDS_CSUM,
        )
    }

    /// A header the net VM sent with a frame for the guest (RX), checked against what the
    /// guest's driver accepted: `GUEST_CSUM` for a partial or already-valid checksum,
    /// `GUEST_TSO4`/`GUEST_TSO6` for large frames.
    pub fn check_rx(&self, frame_len: usize, features: u64) -> Result<(), HdrError> {
        let has = |b: u32| features & bit(b) != 0;
        let csum = has(vn::VIRTIO_NET_F_GUEST_CSUM);
        self.check(
            frame_len,
            csum,
            has(vn::VIRTIO_NET_F_GUEST_TSO4),
            has(vn::VIRTIO_NET_F_GUEST_TSO6),
            if csum { NEEDS_CSUM | DATA_VALID } else { 0 },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = OFFLOADS;

    fn tso4(len: u16) -> VnetHdr {
        VnetHdr {
            flags: NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: len,
        }
    }

    #[test]
    fn round_trip() {
        let h = tso4(3);
        assert_eq!(VnetHdr::decode(&h.encode()), h);
    }

    #[test]
    fn offloads_need_their_features() {
        let plain = VnetHdr::default();
        assert_eq!(plain.check_tx(60, 0), Ok(()));
        assert_eq!(plain.check_tx(13, 0), Err(HdrError::Length(13)));
        assert_eq!(
            plain.check_tx(MAX_PLAIN_FRAME + 1, ALL),
            Err(HdrError::Length(MAX_PLAIN_FRAME + 1))
        );
        let big = 30_000;
        assert_eq!(tso4(0).check_tx(big, ALL), Ok(()));
        assert_eq!(tso4(0).check_rx(big, ALL), Ok(()));
        assert_eq!(
            tso4(0).check_tx(big, ALL & !bit(vn::VIRTIO_NET_F_HOST_TSO4)),
            Err(HdrError::Gso(GSO_TCPV4))
        );
        assert_eq!(
            tso4(0).check_rx(big, ALL & !bit(vn::VIRTIO_NET_F_GUEST_TSO4)),
            Err(HdrError::Gso(GSO_TCPV4))
        );
        assert_eq!(tso4(0).check_tx(big, 0), Err(HdrError::Csum));
        let mut no_size = tso4(0);
        no_size.gso_size = 0;
        assert!(no_size.check_tx(big, ALL).is_err());
        let mut ecn = tso4(0);
        ecn.gso_type |= vn::VIRTIO_NET_HDR_GSO_ECN as u8;
        assert!(ecn.check_tx(big, ALL).is_err());
        let mut outside = tso4(0);
        outside.csum_start = 60_000;
        assert_eq!(outside.check_tx(big, ALL), Err(HdrError::Csum));
        let valid = VnetHdr {
            flags: DATA_VALID,
            ..Default::default()
        };
        assert_eq!(valid.check_rx(100, ALL), Ok(()));
        assert_eq!(valid.check_tx(100, ALL), Err(HdrError::Flags(DATA_VALID)));
        assert_eq!(valid.check_rx(100, 0), Err(HdrError::Flags(DATA_VALID)));
        let udp = VnetHdr {
            flags: NEEDS_CSUM,
            gso_type: vn::VIRTIO_NET_HDR_GSO_UDP as u8,
            gso_size: 100,
            csum_offset: 6,
            ..Default::default()
        };
        assert!(udp.check_tx(2000, u64::MAX).is_err());
    }
}
