//! The first message on a connection to `net`: the client's VMM sends it with the ring memfd
//! attached, so the net VM knows how much to map.

use crate::layout::{ring_len, MAX_DATA_SIZE, MIN_DATA_SIZE};
use crate::RingError;

/// "BHN1".
pub const HELLO_MAGIC: [u8; 4] = *b"BHN1";
/// Bytes of an encoded hello.
pub const HELLO_LEN: usize = 16;

/// The hello: the length of the ring memfd to map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Bytes of the ring memfd (header page and both rings).
    pub ring_len: u64,
}

impl Hello {
    /// The 16 bytes on the wire: magic, reserved u32 (0), ring length u64 (little-endian).
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        let (magic, rest) = b.split_at_mut(4);
        magic.copy_from_slice(&HELLO_MAGIC);
        if let Some(len) = rest.get_mut(4..12) {
            len.copy_from_slice(&self.ring_len.to_le_bytes());
        }
        b
    }

    /// Parses a hello; the length must be one a valid ring can have.
    pub fn decode(b: &[u8]) -> Result<Self, RingError> {
        let bad = |why: String| RingError::BadHeader(format!("hello: {why}"));
        if b.len() != HELLO_LEN {
            return Err(bad(format!("{} bytes, not {HELLO_LEN}", b.len())));
        }
        if b.get(..4) != Some(&HELLO_MAGIC[..]) {
            return Err(bad("wrong magic".into()));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(b.get(8..16).unwrap_or(&[0; 8]));
        let ring_len = u64::from_le_bytes(len);
        let fits = (MIN_DATA_SIZE.trailing_zeros()..=MAX_DATA_SIZE.trailing_zeros())
            .any(|shift| ring_len == self::ring_len(1usize << shift) as u64);
        if !fits {
            return Err(bad(format!("{ring_len} bytes is no ring's length")));
        }
        Ok(Self { ring_len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_DATA_SIZE;

    #[test]
    fn round_trip_and_refusals() {
        let h = Hello {
            ring_len: ring_len(DEFAULT_DATA_SIZE) as u64,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[0] = b'x';
        assert!(Hello::decode(&b).is_err());
        assert!(Hello::decode(&h.encode()[..15]).is_err());
        for len in [0u64, 4096, ring_len(DEFAULT_DATA_SIZE) as u64 + 1, u64::MAX] {
            assert!(
                Hello::decode(&Hello { ring_len: len }.encode()).is_err(),
                "{len}"
            );
        }
    }
}
