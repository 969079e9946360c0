//! Parser: checked text → typed [`ParsedFile`]. Every error has a line, a column and a help.

use crate::ast::{Action, Bdf, DeviceId, Effect, Item, Line, ParsedFile, Reset, Rule, Subject};
use crate::diag::Diagnostic;
use crate::lex::{check_bytes, tokenize, Token};
use crate::rights::{FdCaps, FdType, Rights};

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
struct LineError {
    col: u32,
    msg: String,
    help: Option<String>,
}

type LResult<T> = Result<T, LineError>;

fn err<T>(col: u32, msg: impl Into<String>, help: impl Into<String>) -> LResult<T> {
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

fn end_col(tokens: &[Token<'_>]) -> u32 {
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
fn printable(s: &str) -> String {
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
fn check_name(tok: &Token<'_>, what: &str, dots: bool) -> LResult<String> {
    check_name_str(tok.text, tok.col, what, dots)
}

fn check_name_str(s: &str, col: u32, what: &str, dots: bool) -> LResult<String> {
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
fn params<'a>(
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

fn hex_u(s: &str, digits: usize) -> Option<u32> {
    if s.len() != digits || !s.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Parse `pci:DDDD:BB:DD.F`.
pub fn parse_bdf(s: &str) -> Result<Bdf, String> {
    let help = "write the full address as pci:DDDD:BB:DD.F, e.g. pci:0000:03:00.0 (see lspci -D)";
    let Some(addr) = s.strip_prefix("pci:") else {
        return Err(format!("device must start with `pci:`; {help}"));
    };
    let parts: Vec<&str> = addr.split(':').collect();
    let [dom, bus, devfn] = parts.as_slice() else {
        return Err(format!(
            "bad PCI address `{}` (missing domain?); {help}",
            printable(addr)
        ));
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return Err(format!(
            "bad PCI address `{}` (missing .function); {help}",
            printable(addr)
        ));
    };
    let (Some(domain), Some(bus), Some(device), Some(function)) =
        (hex_u(dom, 4), hex_u(bus, 2), hex_u(dev, 2), hex_u(func, 1))
    else {
        return Err(format!("bad PCI address `{}`; {help}", printable(addr)));
    };
    if device > 0x1f {
        return Err(format!(
            "PCI device number {device:#x} is above 0x1f; {help}"
        ));
    }
    if function > 7 {
        return Err(format!("PCI function {function} is above 7; {help}"));
    }
    Ok(Bdf {
        domain: u16::try_from(domain).map_err(|_| help.to_string())?,
        bus: u8::try_from(bus).map_err(|_| help.to_string())?,
        device: u8::try_from(device).map_err(|_| help.to_string())?,
        function: u8::try_from(function).map_err(|_| help.to_string())?,
    })
}

fn parse_device(effect: Effect, all: &[Token<'_>], after: &[Token<'_>]) -> LResult<Action> {
    let Some((obj, rest)) = after.split_first() else {
        return err(
            end_col(all),
            "missing device",
            "e.g. `device pci:0000:03:00.0 id=8086:2723`",
        );
    };
    let bdf = match parse_bdf(obj.text) {
        Ok(b) => b,
        Err(m) => {
            let (msg, help) = m.split_once("; ").unwrap_or((m.as_str(), ""));
            return err(obj.col, msg, help);
        }
    };
    let mut id = None;
    let mut reset = None;
    let mut shared = false;
    for (k, v, col) in params(effect, rest, &["id", "reset", "shared"])? {
        match k {
            "id" => {
                id = Some(if v == "any" {
                    DeviceId::Any
                } else {
                    let parsed = v
                        .split_once(':')
                        .and_then(|(a, b)| Some((hex_u(a, 4)?, hex_u(b, 4)?)));
                    match parsed {
                        Some((vendor, device)) => DeviceId::Pinned {
                            vendor: u16::try_from(vendor).unwrap_or(0),
                            device: u16::try_from(device).unwrap_or(0),
                        },
                        None => {
                            return err(
                                col,
                                format!("bad device id `{}`", printable(v)),
                                "write id=VVVV:DDDD in hex (see lspci -nn) or id=any",
                            )
                        }
                    }
                })
            }
            "reset" => {
                reset = Some(match v {
                    "required" => Reset::Required,
                    "optional" => Reset::Optional,
                    _ => {
                        return err(
                            col,
                            format!("bad reset `{}`", printable(v)),
                            "reset=required (default) or reset=optional",
                        )
                    }
                })
            }
            _ => {
                if v != "exclusive-run" {
                    return err(
                        col,
                        format!("bad shared `{}`", printable(v)),
                        "the only sharing mode is shared=exclusive-run",
                    );
                }
                shared = true;
            }
        }
    }
    if effect == Effect::Grant && id.is_none() {
        return err(
            obj.col,
            format!("device grant for pci:{bdf} has no id="),
            "pin the device with id=VVVV:DDDD (lspci -nn) or write id=any explicitly",
        );
    }
    Ok(Action::Device {
        bdf,
        id,
        reset,
        shared,
    })
}

fn parse_service_obj(
    after: &[Token<'_>],
    all: &[Token<'_>],
    allow_provider: bool,
) -> LResult<(String, Option<String>, u32)> {
    let Some(obj) = after.first() else {
        return err(
            end_col(all),
            "missing service name",
            "e.g. `connect wayland@gpu-vm`",
        );
    };
    if obj.text.contains('=') {
        return err(
            obj.col,
            "missing service name",
            "the service comes before key=value parameters",
        );
    }
    match obj.text.split_once('@') {
        Some((s, p)) if allow_provider => {
            let service = check_name_str(s, obj.col, "service", true)?;
            let pcol = obj
                .col
                .saturating_add(u32::try_from(s.chars().count() + 1).unwrap_or(0));
            let provider = check_name_str(p, pcol, "VM", false)?;
            Ok((service, Some(provider), obj.col))
        }
        Some(_) => err(
            obj.col,
            "`provide` takes a bare service name",
            "the provider is the subject of the rule",
        ),
        None => Ok((check_name(obj, "service", true)?, None, obj.col)),
    }
}

/// Parse a `LIST`: `none` or `TYPE:RIGHT(+RIGHT)*` joined by commas.
pub fn parse_caps(s: &str) -> Result<FdCaps, (usize, String, String)> {
    if s == "none" {
        return Ok(FdCaps::NONE);
    }
    let mut caps = FdCaps::NONE;
    let mut off = 0usize;
    for item in s.split(',') {
        let here = off;
        off += item.chars().count() + 1;
        let Some((ty, rights)) = item.split_once(':') else {
            return Err((
                here,
                format!("`{}` is not TYPE:RIGHTS", printable(item)),
                "e.g. memfd:ro,pipe:w (types: memfd, pipe, dmabuf, socket, fence) or none".into(),
            ));
        };
        let Some(t) = FdType::from_name(ty) else {
            return Err((
                here,
                format!("unknown fd type `{}`", printable(ty)),
                "types are memfd, pipe, dmabuf, socket, fence".into(),
            ));
        };
        if !caps.get(t).is_empty() {
            return Err((
                here,
                format!("`{t}` listed twice"),
                format!("combine the rights with +, e.g. {t}:read+write"),
            ));
        }
        let mut r = Rights::NONE;
        let mut roff = here + ty.chars().count() + 1;
        for name in rights.split('+') {
            let Some(bits) = Rights::from_name(name) else {
                return Err((
                    roff,
                    format!("unknown right `{}`", printable(name)),
                    rights_help(t),
                ));
            };
            if bits.contains(Rights::EXEC) {
                return Err((
                    roff,
                    "`exec` is reserved and never granted in v1".into(),
                    rights_help(t),
                ));
            }
            if bits.contains(Rights::RESIZE) {
                return Err((
                    roff,
                    "`resize` is never granted (shared memory is sealed against grow and shrink)"
                        .into(),
                    rights_help(t),
                ));
            }
            let bad = bits.difference(t.valid_rights());
            if !bad.is_empty() {
                return Err((
                    roff,
                    format!("`{t}:{name}`: {bad} is not a right of {t}"),
                    rights_help(t),
                ));
            }
            r = r | bits;
            roff += name.chars().count() + 1;
        }
        caps.set(t, r);
    }
    Ok(caps)
}

fn rights_help(t: FdType) -> String {
    let names: Vec<&str> = t.grantable_rights().names().collect();
    format!(
        "rights of {t}: {} (aliases: ro = read+map, rw = read+write+map, r = read, w = write)",
        names.join(", ")
    )
}

fn caps_param(v: &str, col: u32) -> LResult<FdCaps> {
    parse_caps(v).map_err(|(off, msg, help)| LineError {
        col: col.saturating_add(u32::try_from(off).unwrap_or(0)),
        msg,
        help: Some(help),
    })
}

fn count_param(k: &str, v: &str, col: u32) -> LResult<u64> {
    if v.starts_with('-') {
        return err(
            col,
            format!("`{k}` cannot be negative"),
            format!("write {k}=N with N ≥ 0"),
        );
    }
    if !v.chars().all(|c| c.is_ascii_digit()) {
        return err(
            col,
            format!("`{k}={}` is not a whole number", printable(v)),
            format!("write {k}=N, e.g. {k}=256"),
        );
    }
    v.parse::<u64>().or_else(|_| {
        err(
            col,
            format!("`{k}={}` is too large", printable(v)),
            "the value must fit in 64 bits",
        )
    })
}

/// Parse a `SIZE`: an integer with a binary unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`).
pub fn parse_size(v: &str) -> Result<u64, (String, String)> {
    let units: [(&str, u64); 5] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ];
    if v.starts_with('-') {
        return Err((
            "sizes cannot be negative".into(),
            "write e.g. shm=64MiB".into(),
        ));
    }
    let digits_end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(digits_end);
    if num.is_empty() {
        return Err((
            format!("`{}` is not a size", printable(v)),
            "write an integer with a binary unit, e.g. 64MiB".into(),
        ));
    }
    if unit.starts_with('.') {
        return Err((
            "fractional sizes are not allowed".into(),
            "use a smaller unit, e.g. 1536MiB instead of 1.5GiB".into(),
        ));
    }
    if unit.is_empty() {
        return Err((
            "size has no unit".into(),
            format!("write {num}B for bytes, or use KiB, MiB, GiB"),
        ));
    }
    let Some(mult) = units.iter().find(|(u, _)| *u == unit).map(|(_, m)| *m) else {
        let hint = match unit {
            "KB" | "kB" | "K" | "k" => format!("binary units only: did you mean {num}KiB?"),
            "MB" | "M" | "m" => format!("binary units only: did you mean {num}MiB?"),
            "GB" | "G" | "g" => format!("binary units only: did you mean {num}GiB?"),
            "TB" | "T" => format!("binary units only: did you mean {num}TiB?"),
            _ => "units are B, KiB, MiB, GiB, TiB".into(),
        };
        return Err((format!("unknown size unit `{}`", printable(unit)), hint));
    };
    let n: u64 = num.parse().map_err(|_| {
        (
            "size does not fit in 64 bits".to_string(),
            "use a smaller value".to_string(),
        )
    })?;
    n.checked_mul(mult).ok_or_else(|| {
        (
            "size does not fit in 64 bits".to_string(),
            "use a smaller value".to_string(),
        )
    })
}

fn parse_provide(effect: Effect, all: &[Token<'_>], after: &[Token<'_>]) -> LResult<Action> {
    let (service, _, _) = parse_service_obj(after, all, false)?;
    let mut a = Action::Provide {
        service,
        c2s: None,
        s2c: None,
        max_fds: None,
        max_conns: None,
    };
    let Action::Provide {
        c2s,
        s2c,
        max_fds,
        max_conns,
        ..
    } = &mut a
    else {
        return err(1, "internal parser error", "report a bug");
    };
    for (k, v, col) in params(
        effect,
        after.get(1..).unwrap_or(&[]),
        &["c2s", "s2c", "max-fds", "max-conns"],
    )? {
        match k {
            "c2s" => *c2s = Some(caps_param(v, col)?),
            "s2c" => *s2c = Some(caps_param(v, col)?),
            "max-fds" => {
                let n = count_param(k, v, col)?;
                if n == 0 || n > u64::from(MAX_FDS_PER_MESSAGE) {
                    return err(
                        col,
                        format!("max-fds={n} is out of range"),
                        format!("virtio_wl carries 1 to {MAX_FDS_PER_MESSAGE} fds per message"),
                    );
                }
                *max_fds = u32::try_from(n).ok();
            }
            _ => {
                let n = count_param(k, v, col)?;
                if n == 0 {
                    return err(
                        col,
                        "max-conns=0 would make the service unusable",
                        "omit max-conns for no limit, or deny the connects",
                    );
                }
                *max_conns = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
        }
    }
    Ok(a)
}

fn parse_connect(effect: Effect, all: &[Token<'_>], after: &[Token<'_>]) -> LResult<Action> {
    let (service, provider, _) = parse_service_obj(after, all, true)?;
    let mut c2s = None;
    let mut s2c = None;
    for (k, v, col) in params(effect, after.get(1..).unwrap_or(&[]), &["c2s", "s2c"])? {
        if k == "c2s" {
            c2s = Some(caps_param(v, col)?);
        } else {
            s2c = Some(caps_param(v, col)?);
        }
    }
    Ok(Action::Connect {
        service,
        provider,
        c2s,
        s2c,
    })
}

fn parse_quota(effect: Effect, verb: &Token<'_>, after: &[Token<'_>]) -> LResult<Action> {
    if effect == Effect::Deny {
        return err(verb.col, "a quota cannot be denied", "quotas are settings, not permissions: grant a smaller quota (the most specific one wins)");
    }
    if let Some(t) = after.first() {
        if !t.text.contains('=') {
            return err(
                t.col,
                "`quota` takes no object",
                "write e.g. `grant browser quota shm=64MiB vfds=256`",
            );
        }
    }
    let mut shm = None;
    let mut shm_count = None;
    let mut vfds = None;
    for (k, v, col) in params(effect, after, &["shm", "shm-count", "vfds"])? {
        match k {
            "shm" => shm = Some(parse_size(v).or_else(|(m, h)| err(col, m, h))?),
            "shm-count" => shm_count = Some(count_param(k, v, col)?),
            _ => vfds = Some(count_param(k, v, col)?),
        }
    }
    if shm.is_none() && shm_count.is_none() && vfds.is_none() {
        return err(
            verb.col,
            "`quota` sets nothing",
            "give at least one of shm=SIZE, shm-count=N, vfds=N",
        );
    }
    Ok(Action::Quota {
        shm,
        shm_count,
        vfds,
    })
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
