//! The Wayland wire format: message headers, arguments decoded against a signature from the
//! protocol tables, and the encoder the proxy uses for the few messages it writes itself.
//!
//! A message is `object: u32`, `size << 16 | opcode: u32`, then the arguments, each a
//! multiple of 4 bytes (native byte order). Strings and arrays are a `u32` length and the
//! bytes padded to 4; a string's length counts its NUL and 0 means null. Fds travel out of
//! band, in order, with the bytes of the message that names them; they take no bytes here.
//! Everything is bounds-checked: bad input is an error, never a panic.

use wayland_client::backend::protocol::{AllowNull, ArgumentType};

/// Bytes in a message header.
pub const HEADER_LEN: usize = 8;
/// The largest message the wire can express (the size field is 16 bits).
pub const MAX_MESSAGE_LEN: usize = 0xffff;
/// The first id of the range the compositor allocates (`new_id`s in events).
pub const SERVER_ID_START: u32 = 0xff00_0000;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The size field is below the header size or not a multiple of 4.
    #[error("bad message size {0}")]
    BadSize(usize),
    /// An argument runs past the end of the message.
    #[error("argument {0} runs past the end of the message")]
    Truncated(usize),
    /// Bytes are left over after the last argument.
    #[error("{0} bytes left after the last argument")]
    Trailing(usize),
    /// A string without its NUL, or with a NUL inside.
    #[error("argument {0} is not a valid string")]
    BadString(usize),
    /// Null where the protocol forbids it (a string, an object or a new id).
    #[error("argument {0} is null")]
    Null(usize),
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The object the message is for.
    pub object: u32,
    /// The request or event number on that object's interface.
    pub opcode: u16,
    /// Bytes of the whole message, header included.
    pub size: usize,
}

fn word(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads the header at the start of `buf`: `None` while fewer than 8 bytes are there, an
/// error for an impossible size. The message is complete once `buf.len() >= size`.
pub fn header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    let (Some(object), Some(w)) = (word(buf, 0), word(buf, 4)) else {
        return Ok(None);
    };
    let size = (w >> 16) as usize;
    if size < HEADER_LEN || size % 4 != 0 {
        return Err(WireError::BadSize(size));
    }
    Ok(Some(Header {
        object,
        opcode: (w & 0xffff) as u16,
        size,
    }))
}

/// One decoded argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg<'a> {
    /// `int`.
    Int(i32),
    /// `uint` (and enums).
    Uint(u32),
    /// `fixed` (24.8), raw.
    Fixed(i32),
    /// `string`: the bytes without the NUL; `None` for a null string.
    Str(Option<&'a [u8]>),
    /// `object`: an id, 0 for null.
    Object(u32),
    /// `new_id`.
    NewId(u32),
    /// `array`.
    Array(&'a [u8]),
    /// `fd`: the next fd of the stream.
    Fd,
}

/// Decodes the arguments of a message body (the bytes after the header) against `sig`.
pub fn parse_args<'a>(sig: &[ArgumentType], body: &'a [u8]) -> Result<Vec<Arg<'a>>, WireError> {
    let mut args = Vec::with_capacity(sig.len());
    let mut at = 0usize;
    for (i, t) in sig.iter().enumerate() {
        let arg = match t {
            ArgumentType::Fd => Arg::Fd,
            ArgumentType::Str(_) | ArgumentType::Array => {
                let len = word(body, at).ok_or(WireError::Truncated(i))? as usize;
                at += 4;
                let padded = len.checked_add(3).ok_or(WireError::Truncated(i))? & !3;
                let end = at.checked_add(padded).ok_or(WireError::Truncated(i))?;
                let bytes = body.get(at..at + len).ok_or(WireError::Truncated(i))?;
                if end > body.len() {
                    return Err(WireError::Truncated(i));
                }
                at = end;
                match t {
                    ArgumentType::Str(null) => {
                        if len == 0 {
                            if *null == AllowNull::No {
                                return Err(WireError::Null(i));
                            }
                            Arg::Str(None)
                        } else {
                            match bytes.split_last() {
                                Some((0, s)) if !s.contains(&0) => Arg::Str(Some(s)),
                                _ => return Err(WireError::BadString(i)),
                            }
                        }
                    }
                    _ => Arg::Array(bytes),
                }
            }
            _ => {
                let v = word(body, at).ok_or(WireError::Truncated(i))?;
                at += 4;
                match t {
                    ArgumentType::Int => Arg::Int(v as i32),
                    ArgumentType::Fixed => Arg::Fixed(v as i32),
                    ArgumentType::Object(null) => {
                        if v == 0 && *null == AllowNull::No {
                            return Err(WireError::Null(i));
                        }
                        Arg::Object(v)
                    }
                    ArgumentType::NewId => {
                        if v == 0 {
                            return Err(WireError::Null(i));
                        }
                        Arg::NewId(v)
                    }
                    _ => Arg::Uint(v),
                }
            }
        };
        args.push(arg);
    }
    if at != body.len() {
        return Err(WireError::Trailing(body.len().saturating_sub(at)));
    }
    Ok(args)
}

/// How many fds a signature takes.
pub fn fd_count(sig: &[ArgumentType]) -> usize {
    sig.iter().filter(|t| matches!(t, ArgumentType::Fd)).count()
}

/// Encodes a message. Fd arguments take no bytes (send the fds alongside).
pub fn encode(object: u32, opcode: u16, args: &[Arg<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&object.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    let bytes = |out: &mut Vec<u8>, b: &[u8], nul: bool| {
        let len = b.len() + usize::from(nul);
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(b);
        if nul {
            out.push(0);
        }
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for a in args {
        match a {
            Arg::Int(v) | Arg::Fixed(v) => out.extend_from_slice(&v.to_ne_bytes()),
            Arg::Uint(v) | Arg::Object(v) | Arg::NewId(v) => {
                out.extend_from_slice(&v.to_ne_bytes())
            }
            Arg::Str(None) => out.extend_from_slice(&0u32.to_ne_bytes()),
            Arg::Str(Some(s)) => bytes(&mut out, s, true),
            Arg::Array(a) => bytes(&mut out, a, false),
            Arg::Fd => {}
        }
    }
    let w = ((out.len() as u32) << 16) | u32::from(opcode);
    out[4..8].copy_from_slice(&w.to_ne_bytes());
    out
}

/// Rewrites the `index`-th 4-byte word of a message body in place (a `uint` argument before
/// any string or array, e.g. a global's version). False if it is not there.
pub fn set_word(msg: &mut [u8], byte_offset: usize, v: u32) -> bool {
    match msg.get_mut(byte_offset..byte_offset + 4) {
        Some(w) => {
            w.copy_from_slice(&v.to_ne_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ArgumentType as T;

    #[test]
    fn encode_then_parse_round_trips() {
        let sig = [
            T::Uint,
            T::Str(AllowNull::No),
            T::Fd,
            T::Array,
            T::Str(AllowNull::Yes),
            T::Object(AllowNull::Yes),
            T::NewId,
            T::Int,
        ];
        let args = [
            Arg::Uint(7),
            Arg::Str(Some(b"wl_shm")),
            Arg::Fd,
            Arg::Array(b"abcde"),
            Arg::Str(None),
            Arg::Object(0),
            Arg::NewId(3),
            Arg::Int(-5),
        ];
        let m = encode(9, 2, &args);
        let h = header(&m).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                object: 9,
                opcode: 2,
                size: m.len()
            }
        );
        assert_eq!(parse_args(&sig, &m[8..]).unwrap(), args);
        assert_eq!(fd_count(&sig), 1);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let sig = [T::Str(AllowNull::No)];
        // length past the end
        let mut m = encode(1, 0, &[Arg::Str(Some(b"abc"))]);
        m[8] = 200;
        assert!(matches!(
            parse_args(&sig, &m[8..]),
            Err(WireError::Truncated(0))
        ));
        // no NUL
        let mut m = encode(1, 0, &[Arg::Str(Some(b"abc"))]);
        m[15] = b'x';
        assert_eq!(parse_args(&sig, &m[8..]), Err(WireError::BadString(0)));
        // null where forbidden
        let m = encode(1, 0, &[Arg::Str(None)]);
        assert_eq!(parse_args(&sig, &m[8..]), Err(WireError::Null(0)));
        let m = encode(1, 0, &[Arg::NewId(0)]);
        assert_eq!(parse_args(&[T::NewId], &m[8..]), Err(WireError::Null(0)));
        // trailing bytes, missing bytes
        let m = encode(1, 0, &[Arg::Uint(1), Arg::Uint(2)]);
        assert_eq!(parse_args(&[T::Uint], &m[8..]), Err(WireError::Trailing(4)));
        assert_eq!(
            parse_args(&[T::Uint, T::Uint, T::Int], &m[8..]),
            Err(WireError::Truncated(2))
        );
        // huge length does not overflow
        let mut m = encode(1, 0, &[Arg::Array(b"")]);
        m[8..12].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(parse_args(&[T::Array], &m[8..]).is_err());
    }

    #[test]
    fn headers_need_eight_bytes_and_a_sane_size() {
        assert_eq!(header(&[0; 7]), Ok(None));
        let mut m = encode(1, 0, &[]);
        assert_eq!(header(&m).unwrap().unwrap().size, 8);
        m[6] = 4; // size 4
        m[7] = 0;
        assert_eq!(header(&m), Err(WireError::BadSize(4)));
        m[6] = 9;
        assert_eq!(header(&m), Err(WireError::BadSize(9)));
    }
}
