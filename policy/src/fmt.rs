//! `policyctl fmt`: canonical text with aligned columns and expanded aliases.
//!
//! Comments and blank lines are kept; every rule is rewritten in canonical form
//! (`memfd:ro` → `memfd:read+map`, parameters in a fixed order) with the subject, verb and
//! object columns aligned within the file. Formatting never changes meaning: the output
//! parses to the same lines.

use crate::ast::{Item, Rule};
use crate::diag::Diagnostic;
use crate::parse::parse_bytes;

/// Split a line into code and comment (a `#` that starts a word).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut prev_ws = true;
    for (i, ch) in line.char_indices() {
        if ch == '#' && prev_ws {
            return (line.get(..i).unwrap_or(""), line.get(i..));
        }
        prev_ws = ch == ' ' || ch == '\t';
    }
    (line, None)
}

/// Format a file. Errors if it does not parse.
pub fn format_file(name: &str, bytes: &[u8]) -> Result<String, Vec<Diagnostic>> {
    let (parsed, diags) = parse_bytes(name, name, bytes);
    if !diags.is_empty() {
        return Err(diags);
    }
    let text = String::from_utf8_lossy(bytes);
    let mut by_line = std::collections::HashMap::new();
    for l in &parsed.lines {
        by_line.insert(l.line, &l.item);
    }
    let rules: Vec<&Rule> = parsed
        .lines
        .iter()
        .filter_map(|l| match &l.item {
            Item::Rule(r) => Some(r),
            _ => None,
        })
        .collect();
    let sw = rules
        .iter()
        .map(|r| r.subject.to_string().len())
        .max()
        .unwrap_or(0);
    let vw = rules
        .iter()
        .map(|r| r.action.verb().len())
        .max()
        .unwrap_or(0);
    let ow = rules
        .iter()
        .map(|r| r.action.object().len())
        .max()
        .unwrap_or(0);
    let mut out = String::with_capacity(text.len());
    let mut lines: Vec<&str> = text.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    for (i, raw) in lines.iter().enumerate() {
        let (_, comment) = split_comment(raw);
        let code = match u32::try_from(i + 1).ok().and_then(|n| by_line.get(&n)) {
            Some(Item::Rule(r)) => {
                let mut s = format!(
                    "{:<5} {:<sw$} {:<vw$} {:<ow$}",
                    r.effect.to_string(),
                    r.subject.to_string(),
                    r.action.verb(),
                    r.action.object()
                );
                for p in r.action.params() {
                    s.push_str("  ");
                    s.push_str(&p);
                }
                s.trim_end().to_string()
            }
            Some(Item::Group { name, members }) => format!("group {name} {}", members.join(" ")),
            Some(Item::Include(p)) => format!("include {p}"),
            Some(Item::Version(v)) => format!("version {v}"),
            None => String::new(),
        };
        match (code.is_empty(), comment) {
            (true, Some(c)) => out.push_str(c.trim_end()),
            (true, None) => {}
            (false, Some(c)) => {
                out.push_str(&code);
                out.push_str("  ");
                out.push_str(c.trim_end());
            }
            (false, None) => out.push_str(&code),
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_aligns_expands_and_keeps_meaning() {
        let src = "version 1\n# header\ngroup apps  browser mail\ngrant gpu-vm provide wayland c2s=pipe:w,memfd:ro max-fds=8\ngrant @apps connect wayland@gpu-vm   # apps\n\ndeny browser connect wayland\n";
        let out = format_file("t.policy", src.as_bytes()).unwrap();
        assert!(out.contains("c2s=memfd:read+map,pipe:write"));
        assert!(out.contains("# header\n"));
        assert!(out.contains("  # apps\n"));
        let a = parse_bytes("t", "t", src.as_bytes()).0;
        let b = parse_bytes("t", "t", out.as_bytes()).0;
        let items = |f: &crate::ast::ParsedFile| {
            f.lines
                .iter()
                .map(|l| (l.line, l.item.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(items(&a), items(&b));
        // Idempotent.
        assert_eq!(format_file("t", out.as_bytes()).unwrap(), out);
    }

    #[test]
    fn fmt_refuses_broken_files() {
        assert!(format_file("t", b"grant a fly b\n").is_err());
    }
}
