//! Byte-level checks and tokenizing: what a policy file must be before it is parsed.
//!
//! UTF-8 only, no NUL bytes, `\n` line endings (CRLF is rejected with a hint), lines of at
//! most [`MAX_LINE_BYTES`], files of at most [`MAX_FILE_BYTES`] and [`MAX_LINES`].

use crate::diag::Diagnostic;

/// Longest line in bytes (excluding the newline).
pub const MAX_LINE_BYTES: usize = 4096;
/// Largest policy file in bytes.
pub const MAX_FILE_BYTES: usize = 8 << 20;
/// Most lines in one file.
pub const MAX_LINES: usize = 200_000;

/// One whitespace-separated word and the 1-based character column it starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token<'a> {
    /// The word.
    pub text: &'a str,
    /// 1-based character column.
    pub col: u32,
}

/// Line and column (1-based, columns in characters) of byte `offset` in `bytes`, counting
/// only the valid UTF-8 prefix for the column.
fn position(bytes: &[u8], offset: usize) -> (u32, u32) {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    let seg = before.get(line_start..).unwrap_or(&[]);
    let col = match std::str::from_utf8(seg) {
        Ok(s) => s.chars().count(),
        Err(e) => e.valid_up_to(),
    } + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

/// Check the raw bytes of a file and return its text.
pub fn check_bytes<'a>(path: &str, bytes: &'a [u8]) -> Result<&'a str, Diagnostic> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Diagnostic::error(
            path,
            0,
            0,
            format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES}",
                bytes.len()
            ),
        )
        .with_help("split the policy into several files"));
    }
    if let Some(off) = bytes.iter().position(|b| *b == 0) {
        let (l, c) = position(bytes, off);
        return Err(Diagnostic::error(path, l, c, "NUL byte in policy file")
            .with_help("policy files are UTF-8 text; is this a binary file?"));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let (l, c) = position(bytes, e.valid_up_to());
            return Err(Diagnostic::error(path, l, c, "invalid UTF-8")
                .with_help("policy files must be UTF-8 encoded"));
        }
    };
    if let Some(off) = text.find('\r') {
        let (l, c) = position(bytes, off);
        return Err(
            Diagnostic::error(path, l, c, "carriage return (CRLF line endings)")
                .with_help("use Unix line endings, e.g. `sed -i 's/\\r$//' FILE`"),
        );
    }
    let mut count = 0usize;
    for (i, line) in text.split('\n').enumerate() {
        count += 1;
        if count > MAX_LINES {
            return Err(Diagnostic::error(
                path,
                u32::try_from(i + 1).unwrap_or(u32::MAX),
                0,
                format!("more than {MAX_LINES} lines"),
            )
            .with_help("split the policy into several files"));
        }
        if line.len() > MAX_LINE_BYTES {
            let col = line
                .char_indices()
                .take_while(|(b, _)| *b < MAX_LINE_BYTES)
                .count()
                + 1;
            return Err(Diagnostic::error(
                path,
                u32::try_from(i + 1).unwrap_or(u32::MAX),
                u32::try_from(col).unwrap_or(u32::MAX),
                format!(
                    "line is {} bytes long; the limit is {MAX_LINE_BYTES}",
                    line.len()
                ),
            )
            .with_help("one rule per line; split long groups into several `group` lines"));
        }
    }
    Ok(text)
}

/// Split a line into words; a `#` at the start of a word starts a comment.
pub fn tokenize(line: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, u32)> = None;
    let mut col: u32 = 0;
    for (i, ch) in line.char_indices() {
        col = col.saturating_add(1);
        if ch == ' ' || ch == '\t' {
            if let Some((s, c)) = start.take() {
                if let Some(text) = line.get(s..i) {
                    out.push(Token { text, col: c });
                }
            }
        } else if start.is_none() {
            if ch == '#' {
                return out;
            }
            start = Some((i, col));
        }
    }
    if let Some((s, c)) = start {
        if let Some(text) = line.get(s..) {
            out.push(Token { text, col: c });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_comments() {
        let t = tokenize("  grant a\tconnect b  # c d");
        let words: Vec<_> = t.iter().map(|t| (t.text, t.col)).collect();
        assert_eq!(
            words,
            vec![("grant", 3), ("a", 9), ("connect", 11), ("b", 19)]
        );
        assert!(tokenize("# only").is_empty());
        assert!(tokenize("").is_empty());
    }

    #[test]
    fn nul_is_located() {
        let e = check_bytes("f", b"version 1\ngr\0ant").unwrap_err();
        assert_eq!((e.line, e.col), (2, 3));
        assert!(e.message.contains("NUL"));
    }

    #[test]
    fn invalid_utf8_is_located() {
        let e = check_bytes("f", b"ok\n\xc3\x28").unwrap_err();
        assert_eq!((e.line, e.col), (2, 1));
    }

    #[test]
    fn crlf_rejected_with_hint() {
        let e = check_bytes("f", b"version 1\r\n").unwrap_err();
        assert_eq!((e.line, e.col), (1, 10));
        assert!(e.help.unwrap_or_default().contains("sed"));
    }

    #[test]
    fn long_line_rejected() {
        let mut s = b"# ".to_vec();
        s.extend(std::iter::repeat_n(b'x', 1 << 20));
        let e = check_bytes("f", &s).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("limit is 4096"));
    }

    #[test]
    fn million_lines_rejected() {
        let s = vec![b'\n'; 1_000_000];
        let e = check_bytes("f", &s).unwrap_err();
        assert!(e.message.contains("more than"));
    }
}
