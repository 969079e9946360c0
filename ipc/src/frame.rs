//! The frame: what one SOCK_SEQPACKET datagram carries on every Bulkhead control socket.
//!
//! Layout of one datagram:
//!
//! ```text
//! byte 0      WIRE_VERSION (currently 1)
//! bytes 1..   the message, postcard-encoded
//! ancillary   0..=MAX_FDS file descriptors in one SCM_RIGHTS control message
//! ```
//!
//! The version byte also guarantees that a valid frame is never empty, so a zero-length
//! datagram is always an error (postcard encodes `()` and unit structs as zero bytes).
//! Both the datagram size and the fd count are bounded, and both bounds are checked by
//! the sender and again by the receiver.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest datagram, version byte included, that a channel sends or accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// Most file descriptors one frame may carry (the same bound as virtio_wl's vfd list).
pub const MAX_FDS: usize = 28;

/// First byte of every frame.
pub const WIRE_VERSION: u8 = 1;

/// Why a message could not be turned into a frame, or a frame into a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The encoded message does not fit in `MAX_FRAME` bytes.
    #[error("frame too large: the message does not fit in {limit} bytes")]
    TooLarge {
        /// The bound, `MAX_FRAME`.
        limit: usize,
    },
    /// More file descriptors than `MAX_FDS` were attached.
    #[error("too many file descriptors in one frame: {count} (at most {limit})")]
    TooManyFds {
        /// How many were attached.
        count: usize,
        /// The bound, `MAX_FDS`.
        limit: usize,
    },
    /// The frame has no bytes at all.
    #[error("empty frame")]
    Empty,
    /// The first byte is not a version this build speaks.
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    BadVersion(u8),
    /// postcard could not encode the message.
    #[error("cannot encode message: {0}")]
    Encode(#[source] postcard::Error),
    /// postcard could not decode the payload as the expected type.
    #[error("cannot decode message: {0}")]
    Decode(#[source] postcard::Error),
    /// The payload decoded but bytes were left over: the peer sent a different type.
    #[error("{0} unexpected trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Checks an fd count against `MAX_FDS`.
pub fn check_fd_count(count: usize) -> Result<(), FrameError> {
    if count > MAX_FDS {
        return Err(FrameError::TooManyFds {
            count,
            limit: MAX_FDS,
        });
    }
    Ok(())
}

/// Encodes `msg` into a frame of at most `MAX_FRAME` bytes.
pub fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    // Grow as needed rather than zeroing MAX_FRAME bytes per message (the hot path).
    let mut buf = Vec::with_capacity(128);
    buf.push(WIRE_VERSION);
    let buf = postcard::to_extend(msg, buf).map_err(FrameError::Encode)?;
    if buf.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { limit: MAX_FRAME });
    }
    Ok(buf)
}

/// Decodes a frame produced by [`encode`]; the whole payload must be one `T`.
pub fn decode<T: DeserializeOwned>(frame: &[u8]) -> Result<T, FrameError> {
    if frame.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { limit: MAX_FRAME });
    }
    let Some((&version, payload)) = frame.split_first() else {
        return Err(FrameError::Empty);
    };
    if version != WIRE_VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(payload).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_message_is_not_empty() {
        let frame = encode(&()).unwrap();
        assert_eq!(frame, vec![WIRE_VERSION]);
        decode::<()>(&frame).unwrap();
    }

    #[test]
    fn oversize_message_refused() {
        let big = vec![7u8; MAX_FRAME];
        assert!(matches!(encode(&big), Err(FrameError::TooLarge { .. })));
        let fits = vec![7u8; MAX_FRAME - 8];
        let frame = encode(&fits).unwrap();
        assert!(frame.len() <= MAX_FRAME);
        assert_eq!(decode::<Vec<u8>>(&frame).unwrap(), fits);
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(decode::<u32>(&[]), Err(FrameError::Empty)));
        assert!(matches!(
            decode::<u32>(&[9, 1]),
            Err(FrameError::BadVersion(9))
        ));
        assert!(matches!(
            decode::<u8>(&[WIRE_VERSION, 1, 2]),
            Err(FrameError::TrailingBytes(1))
        ));
        assert!(matches!(
            decode::<String>(&[WIRE_VERSION, 5, b'a']),
            Err(FrameError::Decode(_))
        ));
    }

    #[test]
    fn fd_count_bound() {
        check_fd_count(MAX_FDS).unwrap();
        assert!(matches!(
            check_fd_count(MAX_FDS + 1),
            Err(FrameError::TooManyFds { count: 29, .. })
        ));
    }
}
