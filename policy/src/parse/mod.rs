//! Parser: checked text → typed [`ParsedFile`]. Every error has a line, a column and a help.

use crate::ast::{Effect, Item, Line, ParsedFile, Rule, Subject};
use crate::diag::Diagnostic;
use crate::lex::{check_bytes, tokenize, Token};

mod device;
mod quota;
mod service;

pub use device::parse_bdf;
pub use quota::parse_size;
pub use service::parse_caps;

use device::parse_device;
use quota::parse_quota;
use service::{parse_connect, parse_provide};

/// Most errors reported per file (the rest are summarized).
pub const MAX_ERRORS_PER_FILE: usize = 50;
/// Longest VM, group or service name.
pub const MAX_NAME_LEN: usize = 64;
/// Most fds in one virtio_wl message (the protocol limit); the default `max-fds`.
pub const MAX_FDS_PER_MESSAGE: u32 = 28;
/// The policy language version this crate understands.
pub const VERSION: u32 = 1;

/// A parse error inside one line: column, message, help.
#[derive(Debug)]
pub(super) struct LineError {
    pub(super) col: u32,
    pub(super) msg: String,
    pub(super) help: Option<String>,
}

pub(super) type LResult<T> = Result<T, LineError>;

pub(super) fn err<T>(col: u32, msg: impl Into<String>, help: impl Into<String>) -> LResult<T> {
    Err(LineError {
        col,
        msg: msg.into(),
        help: Some(help.into()),
    })
}

/// Parse a file's bytes. `name` is the tree-relative name (provenance), `display` the path
/// shown in diagnostics. Returns the lines that parsed and every error.
pub fn parse_bytes(name: &str, display: &str, bytes: &[u8]) -> (ParsedFile, Vec<Diagnostic>) {
    let mut file = ParsedFile {
        name: name.to_string(),
        lines: Vec::new(),
    };
    let text = match check_bytes(display, bytes) {
        Ok(t) => t,
        Err(d) => return (file, vec![d]),
    };
    let mut diags = Vec::new();
    let mut version_seen: Option<u32> = None;
    let mut suppressed = 0usize;
    for (i, raw) in text.split('\n').enumerate() {
        let lineno = u32::try_from(i + 1).unwrap_or(u32::MAX);
        match parse_line(raw) {
            Ok(None) => {}
            Ok(Some(item)) => {
                if let Item::Version(_) = item {
                    if let Some(prev) = version_seen {
                        diags.push(
                            Diagnostic::error(display, lineno, 1, "repeated `version`")
                                .with_help(format!("`version` was already given on line {prev}")),
                        );
                        continue;
                    }
                    version_seen = Some(lineno);
                }
                let words = tokenize(raw)
                    .iter()
                    .map(|t| (t.col, t.text.split('=').next().unwrap_or("").to_string()))
                    .collect();
                file.lines.push(Line {
                    line: lineno,
                    item,
                    words,
                });
            }
            Err(e) => {
                if diags.len() >= MAX_ERRORS_PER_FILE {
                    suppressed += 1;
                    continue;
                }
                let mut d = Diagnostic::error(display, lineno, e.col, e.msg);
                d.help = e.help;
                diags.push(d);
            }
        }
    }
    if suppressed > 0 {
        diags.push(Diagnostic::error(
            display,
            0,
            0,
            format!("{suppressed} more errors not shown"),
        ));
    }
    (file, diags)
}

/// Parse one rule line such as `grant browser connect wayland@gpu-vm` (what the CLI builds
/// from its arguments). Errors use `<command line>` as the path.
pub fn parse_rule_text(text: &str) -> Result<Rule, Diagnostic> {
    let path = "<command line>";
    if text.contains('\n') || text.contains('\r') || text.contains('\0') {
        return Err(Diagnostic::error(path, 1, 1, "a rule is one line")
            .with_help("remove newlines and NUL bytes from the arguments"));
    }
    match parse_line(text) {
        Ok(Some(Item::Rule(r))) => Ok(r),
        Ok(_) => Err(
            Diagnostic::error(path, 1, 1, "expected a grant or deny rule")
                .with_help("e.g. `grant browser connect wayland@gpu-vm`"),
        ),
        Err(e) => {
            let mut d = Diagnostic::error(path, 1, e.col, e.msg);
            d.help = e.help;
            Err(d)
        }
    }
}

pub(super) fn end_col(tokens: &[Token<'_>]) -> u32 {
    tokens.last().map_or(1, |t| {
        t.col
            .saturating_add(u32::try_from(t.text.chars().count()).unwrap_or(u32::MAX))
    })
}

/// Parse one line (already checked: UTF-8, no CR, bounded length).
fn parse_line(raw: &str) -> LResult<Option<Item>> {
    let tokens = tokenize(raw);
    let Some(first) = tokens.first() else {
        return Ok(None);
    };
    let rest = tokens.get(1..).unwrap_or(&[]);
    match first.text {
        "version" => parse_version(first, rest).map(Some),
        "group" => parse_group(first, rest).map(Some),
        "include" => match rest {
            [p] => Ok(Some(Item::Include(p.text.to_string()))),
            [] => err(
                end_col(&tokens),
                "`include` needs a path",
                "e.g. `include vendor/base.policy`",
            ),
            [_, extra, ..] => err(
                extra.col,
                "trailing field after include path",
                "one path per `include` line",
            ),
        },
        "grant" => parse_rule(Effect::Grant, &tokens).map(|r| Some(Item::Rule(r))),
        "deny" => parse_rule(Effect::Deny, &tokens).map(|r| Some(Item::Rule(r))),
        "ask" => err(
            first.col,
            "`ask` is reserved and not supported in v1",
            "prompting needs a trusted UI path; use grant or deny",
        ),
        "allow" | "permit" => err(
            first.col,
            format!("unknown keyword `{}`", first.text),
            "did you mean `grant`?",
        ),
        other => err(
            first.col,
            format!("unknown keyword `{}`", printable(other)),
            "a line starts with grant, deny, group, include or version (or # for a comment)",
        ),
    }
}

/// A token shortened and escaped for messages.
pub(super) fn printable(s: &str) -> String {
    let short: String = s.chars().take(40).collect();
    let mut out = short.escape_debug().to_string();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

fn parse_version(first: &Token<'_>, rest: &[Token<'_>]) -> LResult<Item> {
    match rest {
        [v] => match v.text.parse::<u32>() {
            Ok(VERSION) => Ok(Item::Version(VERSION)),
            Ok(n) => err(
                v.col,
                format!("unsupported policy version {n}"),
                format!("this policyctl understands `version {VERSION}`"),
            ),
            Err(_) => err(
                v.col,
                format!("bad version `{}`", printable(v.text)),
                format!("write `version {VERSION}`"),
            ),
        },
        [] => err(
            first.col + 7,
            "`version` needs a number",
            format!("write `version {VERSION}`"),
        ),
        [_, extra, ..] => err(
            extra.col,
            "trailing field after version",
            format!("write `version {VERSION}`"),
        ),
    }
}

/// Check a VM / group / service name. `dots` allows `.` (service names).
pub(super) fn check_name(tok: &Token<'_>, what: &str, dots: bool) -> LResult<String> {
    check_name_str(tok.text, tok.col, what, dots)
}

pub(super) fn check_name_str(s: &str, col: u32, what: &str, dots: bool) -> LResult<String> {
    let help = if dots {
        "names use a-z, 0-9, `-`, `_` and `.`, start with a letter or digit, at most 64 characters"
    } else {
        "names use a-z, 0-9, `-` and `_`, start with a letter or digit, at most 64 characters"
    };
    if s.is_empty() {
        return err(col, format!("empty {what} name"), help);
    }
    if s.len() > MAX_NAME_LEN {
        return err(
            col,
            format!("{what} name is longer than {MAX_NAME_LEN} characters"),
            help,
        );
    }
    for (i, ch) in s.chars().enumerate() {
        let ok = ch.is_ascii_lowercase()
            || ch.is_ascii_digit()
            || (i > 0 && (ch == '-' || ch == '_' || (dots && ch == '.')));
        if !ok {
            let c = col.saturating_add(u32::try_from(i).unwrap_or(u32::MAX));
            return err(
                c,
                format!(
                    "invalid character {:?} in {what} name `{}`",
                    ch,
                    printable(s)
                ),
                help,
            );
        }
    }
    Ok(s.to_string())
}

fn parse_group(first: &Token<'_>, rest: &[Token<'_>]) -> LResult<Item> {
    let Some((name_tok, members)) = rest.split_first() else {
        return err(
            first.col + 5,
            "`group` needs a name and members",
            "e.g. `group apps browser mail`",
        );
    };
    let name = match name_tok.text.strip_prefix('@') {
        Some(n) => check_name_str(n, name_tok.col + 1, "group", false)?,
        None => check_name(name_tok, "group", false)?,
    };
    if name == "any" {
        return err(
            name_tok.col,
            "`any` is a reserved group",
            "@any always means every non-system VM; choose another name",
        );
    }
    if members.is_empty() {
        return err(
            end_col(rest),
            format!("group `{name}` has no members"),
            "list the member VMs after the name",
        );
    }
    let mut out: Vec<String> = Vec::new();
    for m in members {
        if m.text.starts_with('@') {
            return err(
                m.col,
                format!("group member `{}` is a group", printable(m.text)),
                "groups are flat in v1 (no nesting); list the VMs",
            );
        }
        let v = check_name(m, "VM", false)?;
        if out.contains(&v) {
            return err(
                m.col,
                format!("`{v}` is listed twice in group `{name}`"),
                "list each member once",
            );
        }
        out.push(v);
    }
    Ok(Item::Group { name, members: out })
}

fn parse_subject(tok: &Token<'_>) -> LResult<Subject> {
    match tok.text.strip_prefix('@') {
        Some("any") => Ok(Subject::Any),
        Some(g) => Ok(Subject::Group(check_name_str(
            g,
            tok.col + 1,
            "group",
            false,
        )?)),
        None => Ok(Subject::Vm(check_name(tok, "VM", false)?)),
    }
}

fn parse_rule(effect: Effect, tokens: &[Token<'_>]) -> LResult<Rule> {
    let Some(subj_tok) = tokens.get(1) else {
        return err(
            end_col(tokens),
            "missing subject",
            "e.g. `grant browser connect wayland@gpu-vm`; the subject is a VM, @group or @any",
        );
    };
    let subject = parse_subject(subj_tok)?;
    let Some(verb_tok) = tokens.get(2) else {
        return err(
            end_col(tokens),
            "missing verb",
            "the verb is device, provide, connect or quota",
        );
    };
    let after = tokens.get(3..).unwrap_or(&[]);
    let action = match verb_tok.text {
        "device" => parse_device(effect, tokens, after)?,
        "provide" => parse_provide(effect, tokens, after)?,
        "connect" => parse_connect(effect, tokens, after)?,
        "quota" => parse_quota(effect, verb_tok, after)?,
        other => {
            return err(
                verb_tok.col,
                format!("unknown verb `{}`", printable(other)),
                "the verb is device, provide, connect or quota",
            )
        }
    };
    Ok(Rule {
        effect,
        subject,
        action,
    })
}

/// Split `key=value` parameters; reject repeats and (for denies) any parameter.
pub(super) fn params<'a>(
    effect: Effect,
    toks: &[Token<'a>],
    allowed: &[&str],
) -> LResult<Vec<(&'a str, &'a str, u32)>> {
    let mut out: Vec<(&str, &str, u32)> = Vec::new();
    for t in toks {
        let Some((k, v)) = t.text.split_once('=') else {
            return err(
                t.col,
                format!("trailing field `{}`", printable(t.text)),
                format!(
                    "parameters are key=value; allowed here: {}",
                    allowed.join(", ")
                ),
            );
        };
        if effect == Effect::Deny {
            return err(t.col, "`deny` takes no parameters", "a deny removes the whole permission; to narrow a connect, use a grant with c2s=/s2c=");
        }
        if !allowed.contains(&k) {
            return err(
                t.col,
                format!("unknown parameter `{}`", printable(k)),
                format!("allowed here: {}", allowed.join(", ")),
            );
        }
        if out.iter().any(|(pk, _, _)| *pk == k) {
            return err(
                t.col,
                format!("repeated `{k}=`"),
                format!("give `{k}=` once"),
            );
        }
        if v.is_empty() {
            return err(
                t.col,
                format!("`{k}=` has no value"),
                format!("write {k}=VALUE"),
            );
        }
        let vcol = t
            .col
            .saturating_add(u32::try_from(k.len() + 1).unwrap_or(u32::MAX));
        out.push((k, v, vcol));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Item, (u32, String)> {
        let (f, d) = parse_bytes("t.policy", "t.policy", line.as_bytes());
        match d.first() {
            Some(d) => Err((d.col, d.message.clone())),
            None => f
                .lines
                .into_iter()
                .next()
                .map(|l| l.item)
                .ok_or((0, "empty".into())),
        }
    }

    fn rule(line: &str) -> Rule {
        match one(line) {
            Ok(Item::Rule(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn fails(line: &str, col: u32, needle: &str) {
        match one(line) {
            Err((c, m)) => {
                assert!(m.contains(needle), "{line}: message {m:?} lacks {needle:?}");
                assert_eq!(c, col, "{line}: {m}");
            }
            Ok(i) => panic!("{line}: parsed as {i:?}"),
        }
    }

    #[test]
    fn every_rule_form_roundtrips() {
        for line in [
            "grant net-vm device pci:0000:03:00.0 id=8086:2723",
            "grant usb-vm device pci:0000:00:14.0 id=8086:7ae0 reset=optional",
            "grant a device pci:0000:00:14.1 id=any shared=exclusive-run",
            "grant gui-vm device pci:0000:00:02.0 id=8086:4680 boot-display=take",
            "deny @any device pci:0000:00:14.0",
            "grant gpu-vm provide wayland c2s=memfd:read+map,pipe:write,dmabuf:read+map s2c=memfd:read+map max-fds=8",
            "grant clip-vm provide clipboard c2s=pipe:write s2c=pipe:write max-fds=1 max-conns=4",
            "grant @apps connect wayland@gpu-vm",
            "grant term connect clipboard@clip-vm s2c=none",
            "deny browser connect clipboard",
            "grant @any quota shm=64MiB shm-count=256 vfds=256",
            "grant gpu-vm quota shm=1GiB",
            "grant s provide x.y c2s=socket:send+recv+send-fds,fence:wait+signal+transfer+dup",
        ] {
            let r = rule(line);
            let text = r.to_string();
            let again = rule(&text);
            assert_eq!(r, again, "{line} → {text}");
        }
    }

    #[test]
    fn canonical_text_expands_aliases() {
        let r = rule("grant  gpu-vm   provide wayland c2s=pipe:w,memfd:ro  # c");
        assert_eq!(
            r.to_string(),
            "grant gpu-vm provide wayland c2s=memfd:read+map,pipe:write"
        );
    }

    #[test]
    fn directives() {
        assert_eq!(one("version 1"), Ok(Item::Version(1)));
        assert_eq!(
            one("group apps browser mail"),
            Ok(Item::Group {
                name: "apps".into(),
                members: vec!["browser".into(), "mail".into()]
            })
        );
        assert_eq!(
            one("include vendor/x.policy"),
            Ok(Item::Include("vendor/x.policy".into()))
        );
        fails("version 2", 9, "unsupported");
        fails("version", 8, "needs a number");
        fails("group apps @drivers", 12, "is a group");
        fails("group any a", 7, "reserved");
        fails("group apps", 11, "no members");
        fails("group apps a a", 14, "twice");
    }

    #[test]
    fn each_error_is_located() {
        fails("gront a connect b", 1, "unknown keyword");
        fails(
            "grant a device pci:0000:00:02.0 id=any boot-display=yes",
            53,
            "bad boot-display",
        );
        fails("ask a connect b", 1, "reserved");
        fails("grant Browser connect b", 7, "invalid character");
        fails("grant a fly b", 9, "unknown verb");
        fails("grant a", 8, "missing verb");
        fails("grant", 6, "missing subject");
        fails("grant a connect", 16, "missing service");
        fails("grant a provide w c2s=pipe:map", 28, "not a right of pipe");
        fails("grant a provide w c2s=memfd:exec", 29, "reserved");
        fails("grant a provide w c2s=memfd:resize", 29, "never granted");
        fails("grant a provide w c2s=blob:r", 23, "unknown fd type");
        fails("grant a provide w c2s=memfd:fly", 29, "unknown right");
        fails("grant a provide w c2s=memfd:r,memfd:w", 31, "twice");
        fails("grant a provide w max-fds=29", 27, "out of range");
        fails("grant a provide w max-fds=0", 27, "out of range");
        fails("grant a provide w frob=1", 19, "unknown parameter");
        fails("grant a provide w trailing", 19, "trailing field");
        fails(
            "grant a device pci:0000:03:00.0 id=8086:2723 id=8086:2723",
            46,
            "repeated",
        );
        fails("grant a device pci:0000:03:00.0", 16, "no id=");
        fails("grant a device pci:0000:03:00.8 id=any", 16, "above 7");
        fails("grant a device pci:03:00.0 id=any", 16, "missing domain");
        fails("grant a device pci:0000:03:20.0 id=any", 16, "above 0x1f");
        fails("grant a device 0000:03:00.0 id=any", 16, "pci:");
        fails(
            "grant a device pci:0000:03:00.0 id=80862723",
            36,
            "bad device id",
        );
        fails("deny a connect b c2s=none", 18, "no parameters");
        fails("deny a quota shm=1B", 8, "cannot be denied");
        fails("grant a quota", 9, "sets nothing");
        fails("grant a quota x shm=1B", 15, "no object");
        fails("grant a provide w@x", 17, "bare service");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size("16777215TiB"), Ok(16_777_215u64 << 40));
        for (bad, needle) in [
            ("-1", "negative"),
            ("18446744073709551616B", "64 bits"),
            ("16777216TiB", "64 bits"),
            ("1.5GiB", "fractional"),
            ("10GB", "unknown size unit"),
            ("100", "no unit"),
            ("MiB", "not a size"),
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.0.contains(needle), "{bad}: {e:?}");
        }
        assert!(parse_size("10GB").unwrap_err().1.contains("10GiB"));
        fails("grant a quota shm=-1", 19, "negative");
        fails("grant a quota vfds=-1", 20, "negative");
        fails("grant a quota shm-count=1.5", 25, "whole number");
    }

    #[test]
    fn garbage_does_not_panic() {
        for s in [
            "\u{0}",
            "grant @ connect",
            "grant a connect @",
            "grant a connect b@",
            "=",
            "grant a quota ==",
            "group @ a",
        ] {
            let _ = parse_bytes("t", "t", s.as_bytes());
        }
    }
}
