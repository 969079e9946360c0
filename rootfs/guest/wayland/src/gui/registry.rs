//! The GUI side's registry filter: what a connection from the hub may see and bind.
//!
//! weston in gui-vm runs with `--debug` (the agent needs its scene graph and screenshots),
//! which offers privileged globals (`weston_screenshooter`, `weston_debug_v1`) to every
//! client of that weston. The app proxy hides them from the clients it serves, but an app
//! VM is not trusted to run its proxy: it may speak Wayland on its virtio_wl connection
//! itself. So the GUI proxy, which every connection from the hub goes through, applies the
//! same allow-list on its side: it cuts both byte streams into messages (headers only, no
//! other decoding), follows `wl_display.get_registry` to know the connection's registries,
//! drops every `wl_registry.global` (and its `global_remove`) whose interface the app
//! proxy would not serve ([`protocol::global_verdict`], from the protocol XML tables), and
//! refuses a `wl_registry.bind` to any name it did not pass on: the app side gets
//! `wl_display.error` (`invalid_object`) and the connection ends; nothing of the bind
//! reaches weston. The agent's own connection goes to weston's socket directly and keeps
//! every global.

use std::collections::{HashMap, HashSet};

use crate::app::state::{code, error_event};
use crate::protocol::{self, Verdict};
use crate::wire::{self, Arg};

/// Most registries one connection may create (a client needs one; each is state here).
pub const MAX_REGISTRIES: usize = 1024;

/// Why a connection from the hub is refused: sent to it as `wl_display.error`, then it is
/// closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error on object {object} (code {code}): {message}")]
pub struct Refusal {
    /// The object the error is about.
    pub object: u32,
    /// `wl_display.error` code.
    pub code: u32,
    /// Why.
    pub message: String,
}

impl Refusal {
    fn new(object: u32, code: u32, message: impl Into<String>) -> Self {
        Self {
            object,
            code,
            message: message.into(),
        }
    }

    /// The `wl_display.error` event that tells the client.
    pub fn event(&self) -> Vec<u8> {
        error_event(self.object, self.code, &self.message)
    }
}

/// One connection's filter state: its registries, the global names it was shown, and the
/// bytes of a message not yet complete in each direction.
#[derive(Default)]
pub struct RegistryFilter {
    registries: HashSet<u32>,
    /// Names announced to this connection, with their interface.
    offered: HashMap<u32, String>,
    /// Names not announced (their `global_remove` is dropped too).
    hidden: HashSet<u32>,
    requests: Vec<u8>,
    events: Vec<u8>,
}

/// Cuts complete messages off the front of `pending`, calling `each` for each; keeps the
/// rest. An impossible size is an error.
fn messages<E>(
    pending: &mut Vec<u8>,
    mut each: impl FnMut(wire::Header, &[u8]) -> Result<(), E>,
    bad: impl Fn(wire::WireError) -> E,
) -> Result<(), E> {
    let mut at = 0;
    loop {
        let rest = pending.get(at..).unwrap_or_default();
        let h = match wire::header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Err(bad(e)),
        };
        let Some(msg) = rest.get(..h.size) else {
            break;
        };
        each(h, msg)?;
        at += h.size;
    }
    pending.drain(..at);
    Ok(())
}

impl RegistryFilter {
    /// A filter for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes bytes from the app side; returns the complete messages that may go to weston.
    /// A refusal means: send its event to the app side and close the connection (the
    /// messages before the refused one are valid, but are not returned: the connection
    /// ends anyway).
    pub fn requests(&mut self, data: &[u8]) -> Result<Vec<u8>, Refusal> {
        let mut pending = std::mem::take(&mut self.requests);
        pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(pending.len());
        let r = messages(
            &mut pending,
            |h, msg| {
                self.request(h, msg)?;
                out.extend_from_slice(msg);
                Ok(())
            },
            |e| Refusal::new(1, code::INVALID_METHOD, e.to_string()),
        );
        self.requests = pending;
        r.map(|()| out)
    }

    /// Takes bytes from weston; returns the complete messages the app side may see. An
    /// error means weston's stream cannot be understood (the connection ends).
    pub fn events(&mut self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut pending = std::mem::take(&mut self.events);
        pending.extend_from_slice(data);
        let mut out = Vec::with_capacity(pending.len());
        let r = messages(
            &mut pending,
            |h, msg| {
                if self.event(h, msg)? {
                    out.extend_from_slice(msg);
                }
                Ok(())
            },
            |e| format!("from weston: {e}"),
        );
        self.events = pending;
        r.map(|()| out)
    }

    fn request(&mut self, h: wire::Header, msg: &[u8]) -> Result<(), Refusal> {
        let body = msg.get(wire::HEADER_LEN..).unwrap_or_default();
        if h.object == 1 {
            let Some((op, desc)) =
                protocol::message_named(protocol::display().requests, "get_registry")
            else {
                return Err(Refusal::new(1, code::IMPLEMENTATION, "no wl_display table"));
            };
            if h.opcode != op {
                return Ok(());
            }
            let args = wire::parse_args(desc.signature, body)
                .map_err(|e| Refusal::new(1, code::INVALID_METHOD, e.to_string()))?;
            let Some(Arg::NewId(id)) = args.first() else {
                return Err(Refusal::new(
                    1,
                    code::INVALID_METHOD,
                    "get_registry without id",
                ));
            };
            if self.registries.len() >= MAX_REGISTRIES && !self.registries.contains(id) {
                return Err(Refusal::new(1, code::IMPLEMENTATION, "too many registries"));
            }
            self.registries.insert(*id);
            return Ok(());
        }
        if !self.registries.contains(&h.object) {
            return Ok(());
        }
        let registry = h.object;
        let Some((op, desc)) = protocol::interface("wl_registry")
            .and_then(|i| protocol::message_named(i.requests, "bind"))
        else {
            return Err(Refusal::new(
                1,
                code::IMPLEMENTATION,
                "no wl_registry table",
            ));
        };
        if h.opcode != op {
            return Err(Refusal::new(
                registry,
                code::INVALID_METHOD,
                format!("wl_registry has no request {}", h.opcode),
            ));
        }
        let args = wire::parse_args(desc.signature, body)
            .map_err(|e| Refusal::new(registry, code::INVALID_METHOD, e.to_string()))?;
        let (Some(Arg::Uint(name)), Some(Arg::Str(iface))) = (args.first(), args.get(1)) else {
            return Err(Refusal::new(
                registry,
                code::INVALID_METHOD,
                "malformed bind",
            ));
        };
        let iface = iface.unwrap_or_default();
        match self.offered.get(name) {
            Some(i) if i.as_bytes() == iface => Ok(()),
            _ => Err(Refusal::new(
                registry,
                code::INVALID_OBJECT,
                format!(
                    "invalid global {} ({name}): not offered to other VMs",
                    String::from_utf8_lossy(iface)
                ),
            )),
        }
    }

    /// Whether an event from weston goes on.
    fn event(&mut self, h: wire::Header, msg: &[u8]) -> Result<bool, String> {
        if !self.registries.contains(&h.object) {
            return Ok(true);
        }
        let Some(reg) = protocol::interface("wl_registry") else {
            return Err("no wl_registry table".into());
        };
        let body = msg.get(wire::HEADER_LEN..).unwrap_or_default();
        let desc = reg
            .events
            .get(usize::from(h.opcode))
            .ok_or_else(|| format!("from weston: wl_registry has no event {}", h.opcode))?;
        let args =
            wire::parse_args(desc.signature, body).map_err(|e| format!("from weston: {e}"))?;
        match (desc.name, args.first(), args.get(1)) {
            ("global", Some(Arg::Uint(name)), Some(Arg::Str(Some(iface)))) => {
                let iface = String::from_utf8_lossy(iface).into_owned();
                match protocol::global_verdict(&iface) {
                    Verdict::Serve(_) => {
                        self.offered.insert(*name, iface);
                        Ok(true)
                    }
                    Verdict::Hide(why) => {
                        log::debug!("hiding global {iface} ({name}) from the hub: {why}");
                        self.hidden.insert(*name);
                        Ok(false)
                    }
                }
            }
            ("global_remove", Some(Arg::Uint(name)), _) => Ok(!self.hidden.contains(name)),
            _ => Err(format!(
                "from weston: a malformed wl_registry.{}",
                desc.name
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode;

    fn global(reg: u32, name: u32, iface: &str, version: u32) -> Vec<u8> {
        encode(
            reg,
            0,
            &[
                Arg::Uint(name),
                Arg::Str(Some(iface.as_bytes())),
                Arg::Uint(version),
            ],
        )
    }

    fn bind(reg: u32, name: u32, iface: &str, id: u32) -> Vec<u8> {
        encode(
            reg,
            0,
            &[
                Arg::Uint(name),
                Arg::Str(Some(iface.as_bytes())),
                Arg::Uint(1),
                Arg::NewId(id),
            ],
        )
    }

    #[test]
    fn privileged_globals_are_dropped_and_their_binds_refused() {
        let mut f = RegistryFilter::new();
        let get = encode(1, 1, &[Arg::NewId(2)]);
        assert_eq!(f.requests(&get).unwrap(), get);
        let mut ev = global(2, 1, "wl_compositor", 5);
        ev.extend(global(2, 7, "weston_screenshooter", 1));
        ev.extend(global(2, 8, "weston_debug_v1", 1));
        ev.extend(global(2, 9, "wl_shm", 1));
        ev.extend(encode(2, 1, &[Arg::Uint(7)]));
        ev.extend(encode(2, 1, &[Arg::Uint(9)]));
        let mut want = global(2, 1, "wl_compositor", 5);
        want.extend(global(2, 9, "wl_shm", 1));
        want.extend(encode(2, 1, &[Arg::Uint(9)]));
        assert_eq!(f.events(&ev).unwrap(), want);
        // An offered global binds; a hidden one, a name never announced, or a mismatched
        // interface is refused on the registry.
        let ok = bind(2, 1, "wl_compositor", 3);
        assert_eq!(f.requests(&ok).unwrap(), ok);
        for (name, iface) in [
            (7, "weston_screenshooter"),
            (8, "weston_debug_v1"),
            (42, "weston_debug_v1"),
            (1, "weston_debug_v1"),
        ] {
            let mut g = RegistryFilter::new();
            g.requests(&get).unwrap();
            g.events(&ev).unwrap();
            let r = g.requests(&bind(2, name, iface, 4)).unwrap_err();
            assert_eq!((r.object, r.code), (2, code::INVALID_OBJECT), "{r}");
            let e = r.event();
            assert_eq!(wire::header(&e).unwrap().unwrap().object, 1);
        }
    }

    #[test]
    fn partial_messages_wait_and_other_objects_pass() {
        let mut f = RegistryFilter::new();
        let mut stream = encode(1, 1, &[Arg::NewId(2)]);
        stream.extend(encode(5, 3, &[Arg::Uint(1), Arg::Int(-1)]));
        stream.extend(bind(2, 3, "wl_seat", 6));
        // Byte by byte: nothing is forwarded before it is complete, and the bind (of a
        // name not announced yet) is refused.
        let mut out = Vec::new();
        let mut refused = None;
        for b in &stream {
            match f.requests(std::slice::from_ref(b)) {
                Ok(o) => out.extend(o),
                Err(r) => {
                    refused = Some(r);
                    break;
                }
            }
        }
        assert_eq!(out, stream[..stream.len() - bind(2, 3, "wl_seat", 6).len()]);
        assert_eq!(refused.map(|r| r.code), Some(code::INVALID_OBJECT));
        // Events split anywhere come out whole.
        let mut f = RegistryFilter::new();
        f.requests(&encode(1, 1, &[Arg::NewId(2)])).unwrap();
        let ev = global(2, 3, "wl_seat", 7);
        let (a, b) = ev.split_at(11);
        assert!(f.events(a).unwrap().is_empty());
        assert_eq!(f.events(b).unwrap(), ev);
        let b = bind(2, 3, "wl_seat", 6);
        assert_eq!(f.requests(&b).unwrap(), b);
    }

    #[test]
    fn malformed_requests_are_refused() {
        let mut f = RegistryFilter::new();
        let r = f.requests(&[1, 0, 0, 0, 1, 0, 6, 0]).unwrap_err();
        assert_eq!((r.object, r.code), (1, code::INVALID_METHOD));
        let mut f = RegistryFilter::new();
        f.requests(&encode(1, 1, &[Arg::NewId(2)])).unwrap();
        let r = f.requests(&encode(2, 5, &[])).unwrap_err();
        assert_eq!((r.object, r.code), (2, code::INVALID_METHOD));
        let r = f.requests(&encode(2, 0, &[Arg::Uint(1)])).unwrap_err();
        assert_eq!((r.object, r.code), (2, code::INVALID_METHOD));
        let mut f = RegistryFilter::new();
        let r = f.requests(&encode(1, 1, &[])).unwrap_err();
        assert_eq!(r.code, code::INVALID_METHOD);
        let mut f = RegistryFilter::new();
        let mut many = Vec::new();
        for id in 2..(MAX_REGISTRIES as u32 + 3) {
            many.extend(encode(1, 1, &[Arg::NewId(id)]));
        }
        assert_eq!(f.requests(&many).unwrap_err().code, code::IMPLEMENTATION);
    }
}
