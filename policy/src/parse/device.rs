//! `device pci:DDDD:BB:DD.F`: PCI addresses and the device rule's parameters.

use super::{end_col, err, params, printable, LResult};
use crate::ast::{Action, Bdf, DeviceId, Effect, Reset};
use crate::lex::Token;

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

pub(super) fn parse_device(
    effect: Effect,
    all: &[Token<'_>],
    after: &[Token<'_>],
) -> LResult<Action> {
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
    let mut boot_display = false;
    for (k, v, col) in params(effect, rest, &["id", "reset", "shared", "boot-display"])? {
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
            "boot-display" => {
                if v != "take" {
                    return err(
                        col,
                        format!("bad boot-display `{}`", printable(v)),
                        "boot-display=take gives the VM the boot VGA device (the host then stops \
                         using it for its console)",
                    );
                }
                boot_display = true;
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
        boot_display,
    })
}
