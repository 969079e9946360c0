//! `provide` and `connect`: service names, and the rights lists (`c2s=`, `s2c=`) fds carry.

use super::quota::count_param;
use super::{
    check_name, check_name_str, end_col, err, params, printable, LResult, LineError,
    MAX_FDS_PER_MESSAGE,
};
use crate::ast::{Action, Effect};
use crate::lex::Token;
use crate::rights::{FdCaps, FdType, Rights};

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

pub(super) fn parse_provide(
    effect: Effect,
    all: &[Token<'_>],
    after: &[Token<'_>],
) -> LResult<Action> {
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

pub(super) fn parse_connect(
    effect: Effect,
    all: &[Token<'_>],
    after: &[Token<'_>],
) -> LResult<Action> {
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
