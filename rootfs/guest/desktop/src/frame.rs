//! Screenshot frames: how a picture (and weston's scene at that moment) travels from the GUI
//! VM to the emulated host (over a virtio_wl connection to a host socket) and from there to
//! the build machine (over the host's second serial port). One frame is a header line and a
//! body:
//!
//! ```text
//! BHSHOT1 <kind> <name> <length>\n<length bytes>
//! ```
//!
//! `kind` is `png`, `scene` (the scene graph text) or `note` (a line of text); `name` is
//! 1–32 of `[a-z0-9-]`; `length` is decimal, at most [`MAX_BODY`]. The decoder is
//! incremental, bounded and never trusts the sender: a malformed header is an error, and
//! nothing is buffered beyond one frame.

/// The header's first word.
pub const MAGIC: &str = "BHSHOT1";

/// The largest body (a 640×480 screenshot is tens of KiB).
pub const MAX_BODY: usize = 16 << 20;

/// The longest header line.
pub const MAX_HEADER: usize = 80;

/// The longest name.
pub const MAX_NAME: usize = 32;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A PNG file as weston-screenshooter wrote it.
    Png,
    /// `weston-debug scene-graph` output at the moment of the picture.
    Scene,
    /// A line of text from the agent.
    Note,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Png => "png",
            Kind::Scene => "scene",
            Kind::Note => "note",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        match s {
            "png" => Some(Kind::Png),
            "scene" => Some(Kind::Scene),
            "note" => Some(Kind::Note),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub name: String,
    pub body: Vec<u8>,
}

/// Why a stream of frames is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame header longer than {MAX_HEADER} bytes")]
    HeaderTooLong,
    #[error("a malformed frame header {0:?}")]
    BadHeader(String),
    #[error("a frame body of {0} bytes (at most {MAX_BODY})")]
    TooLarge(u64),
    #[error("a frame name {0:?} (1 to {MAX_NAME} of [a-z0-9-])")]
    BadName(String),
    #[error("the stream ended inside a frame")]
    Truncated,
}

/// Is `name` a frame name?
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Frame {
    /// A frame, if `name` is valid and `body` not too large.
    pub fn new(kind: Kind, name: &str, body: Vec<u8>) -> Result<Frame, FrameError> {
        if !valid_name(name) {
            return Err(FrameError::BadName(name.to_string()));
        }
        if body.len() > MAX_BODY {
            return Err(FrameError::TooLarge(body.len() as u64));
        }
        Ok(Frame {
            kind,
            name: name.to_string(),
            body,
        })
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!(
            "{MAGIC} {} {} {}\n",
            self.kind.as_str(),
            self.name,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// An incremental decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// The header of the frame whose body is being read.
    pending: Option<(Kind, String, usize)>,
    failed: Option<FrameError>,
}

fn parse_header(line: &[u8]) -> Result<(Kind, String, usize), FrameError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| FrameError::BadHeader(String::from_utf8_lossy(line).into_owned()))?;
    let bad = || FrameError::BadHeader(text.to_string());
    let mut words = text.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(bad());
    }
    let kind = words.next().and_then(Kind::parse).ok_or_else(bad)?;
    let name = words.next().ok_or_else(bad)?;
    if !valid_name(name) {
        return Err(FrameError::BadName(name.to_string()));
    }
    let len_text = words.next().ok_or_else(bad)?;
    if words.next().is_some()
        || len_text.is_empty()
        || len_text.len() > 12
        || !len_text.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let len: u64 = len_text.parse().map_err(|_| bad())?;
    if len > MAX_BODY as u64 {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, name.to_string(), len as usize))
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Feeds bytes; returns the frames they complete. After an error every later call
    /// returns that error.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            match &self.pending {
                None => {
                    let nl = bytes.iter().position(|b| *b == b'\n');
                    let take = nl.map_or(bytes.len(), |i| i + 1);
                    let (head, rest) = bytes.split_at(take);
                    self.buf.extend_from_slice(head);
                    bytes = rest;
                    if self.buf.len() > MAX_HEADER + 1 {
                        return Err(self.fail(FrameError::HeaderTooLong));
                    }
                    if nl.is_some() {
                        let line = std::mem::take(&mut self.buf);
                        let line = line.strip_suffix(b"\n").unwrap_or(&line);
                        match parse_header(line) {
                            Ok(h) => self.pending = Some(h),
                            Err(e) => return Err(self.fail(e)),
                        }
                    }
                }
                Some((_, _, len)) => {
                    let want = len.saturating_sub(self.buf.len());
                    let (body, rest) = bytes.split_at(want.min(bytes.len()));
                    self.buf.extend_from_slice(body);
                    bytes = rest;
                }
            }
            if let Some((kind, name, len)) = &self.pending {
                if self.buf.len() == *len {
                    out.push(Frame {
                        kind: *kind,
                        name: name.clone(),
                        body: std::mem::take(&mut self.buf),
                    });
                    self.pending = None;
                }
            }
        }
        Ok(out)
    }

    /// Says whether the stream ended cleanly (between frames).
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.pending.is_some() || !self.buf.is_empty() {
            return Err(FrameError::Truncated);
        }
        Ok(())
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        self.buf.clear();
        self.pending = None;
        e
    }
}

/// Decodes a whole stream.
pub fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut d = Decoder::new();
    let frames = d.feed(bytes)?;
    d.finish()?;
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_whatever_the_chunking() {
        let frames = vec![
            Frame::new(Kind::Png, "desktop", vec![0x89, b'P', b'N', b'G', b'\n', 0]).unwrap(),
            Frame::new(Kind::Scene, "desktop", b"Output 0\n".to_vec()).unwrap(),
            Frame::new(Kind::Note, "x-1", Vec::new()).unwrap(),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode()).collect();
        assert_eq!(decode_all(&bytes).unwrap(), frames);
        for chunk in [1, 2, 7, 64] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for c in bytes.chunks(chunk) {
                got.extend(d.feed(c).unwrap());
            }
            d.finish().unwrap();
            assert_eq!(got, frames, "chunks of {chunk}");
        }
    }

    #[test]
    fn malformed_streams_are_errors() {
        for (bytes, want) in [
            (&b"BHSHOT2 png a 1\nx"[..], "malformed"),
            (b"BHSHOT1 exe a 1\nx", "malformed"),
            (b"BHSHOT1 png A 1\nx", "name"),
            (b"BHSHOT1 png ../x 1\nx", "name"),
            (b"BHSHOT1 png a -1\nx", "malformed"),
            (b"BHSHOT1 png a 1 2\nx", "malformed"),
            (b"BHSHOT1 png a 99999999999\n", "bytes"),
            (b"BHSHOT1 png a 4\nab", "ended inside"),
        ] {
            let e = decode_all(bytes).unwrap_err().to_string();
            assert!(
                e.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(bytes)
            );
        }
        let long = vec![b'B'; 200];
        assert_eq!(decode_all(&long).unwrap_err(), FrameError::HeaderTooLong);
        assert!(Frame::new(Kind::Png, "", Vec::new()).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::new();
            let _ = d.feed(&bytes);
            let _ = d.finish();
        }
    }
}
