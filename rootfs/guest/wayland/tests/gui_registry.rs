//! The GUI proxy's registry filter against real Debian weston 10 run with `--debug` (as in
//! gui-vm): a client that speaks Wayland itself on its connection to the GUI proxy,
//! bypassing the app proxy (a compromised app VM), neither sees nor binds weston's
//! privileged globals, while a client on weston's own socket (the agent) still does. The
//! connection is the stand-in transport's (the names say so).

mod common;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use bulkhead_wayland::sock;
use bulkhead_wayland::transport::{Channel, Transport};
use bulkhead_wayland::wire::{self, Arg};
use common::*;

const PRIVILEGED: [&str; 2] = ["weston_screenshooter", "weston_debug_v1"];

/// One side of a raw Wayland connection: bytes out, whole messages in.
trait Raw {
    fn put(&mut self, msg: &[u8]);
    /// The next chunk of bytes; empty at the end.
    fn chunk(&mut self) -> Vec<u8>;
}

struct Hub(Box<dyn Channel>);

impl Raw for Hub {
    fn put(&mut self, msg: &[u8]) {
        // After a refused bind the proxy may close the connection before the test's next
        // request goes out: the reader then sees the end, which is what the test checks.
        match self.0.send(msg, &[]) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => panic!("send to the GUI proxy: {e}"),
        }
    }
    fn chunk(&mut self) -> Vec<u8> {
        let r = sock::poll(&[(self.0.poll_fd(), libc::POLLIN)], 30_000).unwrap();
        assert_ne!(r[0], 0, "no answer from the GUI proxy within 30 s");
        self.0.recv().unwrap().0
    }
}

struct Local(UnixStream);

impl Raw for Local {
    fn put(&mut self, msg: &[u8]) {
        std::io::Write::write_all(&mut self.0, msg).unwrap();
    }
    fn chunk(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let (n, _fds) = sock::recv_with_fds(self.0.as_fd(), &mut buf, false).unwrap();
        buf.truncate(n);
        buf
    }
}

/// Messages as (object, opcode, bytes) until `until` says stop or the stream ends.
fn read_until(c: &mut dyn Raw, mut until: impl FnMut(u32, u16, &[u8]) -> bool) -> bool {
    let mut pending = Vec::new();
    loop {
        while let Some(h) = wire::header(&pending).unwrap() {
            if pending.len() < h.size {
                break;
            }
            let msg: Vec<u8> = pending.drain(..h.size).collect();
            if until(h.object, h.opcode, &msg) {
                return true;
            }
        }
        let more = c.chunk();
        if more.is_empty() {
            return false;
        }
        pending.extend(more);
    }
}

/// `wl_display.get_registry(2)`, `wl_display.sync(3)`: every global up to the callback.
fn globals(c: &mut dyn Raw) -> HashMap<String, u32> {
    c.put(&wire::encode(1, 1, &[Arg::NewId(2)]));
    c.put(&wire::encode(1, 0, &[Arg::NewId(3)]));
    let mut g = HashMap::new();
    let done = read_until(c, |object, opcode, msg| {
        if object == 2 && opcode == 0 {
            let sig = [
                wayland_client::backend::protocol::ArgumentType::Uint,
                wayland_client::backend::protocol::ArgumentType::Str(
                    wayland_client::backend::protocol::AllowNull::No,
                ),
                wayland_client::backend::protocol::ArgumentType::Uint,
            ];
            if let [Arg::Uint(name), Arg::Str(Some(i)), _] =
                wire::parse_args(&sig, &msg[8..]).unwrap()[..]
            {
                g.insert(String::from_utf8_lossy(i).into_owned(), name);
            }
        }
        object == 3
    });
    assert!(
        done,
        "the connection ended before wl_display.sync's callback"
    );
    g
}

/// Binds `iface` at `name` on registry 2 as id 4, then syncs (callback 5). Returns the
/// `wl_display.error` (object, code) if one came, and whether the connection then ended.
fn bind(c: &mut dyn Raw, name: u32, iface: &str) -> (Option<(u32, u32)>, bool) {
    c.put(&wire::encode(
        2,
        0,
        &[
            Arg::Uint(name),
            Arg::Str(Some(iface.as_bytes())),
            Arg::Uint(1),
            Arg::NewId(4),
        ],
    ));
    c.put(&wire::encode(1, 0, &[Arg::NewId(5)]));
    let mut error = None;
    let synced = read_until(c, |object, opcode, msg| {
        if object == 1 && opcode == 0 {
            let w = |i: usize| u32::from_ne_bytes(msg[i..i + 4].try_into().unwrap());
            error = Some((w(8), w(12)));
        }
        object == 5
    });
    (error, !synced)
}

#[test]
fn standin_transport_a_client_bypassing_the_app_proxy_cannot_see_or_bind_westons_debug_globals() {
    let weston = Weston::headless();
    // On weston's own socket (the agent's way in) `--debug`'s globals are there, and a
    // bind of each works.
    let mut local = Local(UnixStream::connect(&weston.socket).unwrap());
    let direct = globals(&mut local);
    for g in PRIVILEGED {
        assert!(
            direct.contains_key(g),
            "weston --debug offers {g}: {direct:?}"
        );
    }
    let (err, ended) = bind(&mut local, direct["weston_debug_v1"], "weston_debug_v1");
    assert_eq!((err, ended), (None, false), "the local bind works");

    let p = proxies(&weston, 0);
    // Through the GUI proxy, raw (no app proxy): the served globals are there, the
    // privileged ones are not.
    let mut raw = Hub(p.transport.connect("wayland@gui-vm").unwrap());
    let via = globals(&mut raw);
    assert!(via.contains_key("wl_compositor") && via.contains_key("xdg_wm_base"));
    for g in PRIVILEGED {
        assert!(!via.contains_key(g), "{g} is offered to the hub: {via:?}");
    }
    // Binding them by the names weston gave them: a protocol error on the registry
    // (invalid_object), and that connection ends.
    for g in PRIVILEGED {
        let mut raw = Hub(p.transport.connect("wayland@gui-vm").unwrap());
        globals(&mut raw);
        let (err, ended) = bind(&mut raw, direct[g], g);
        assert_eq!(err, Some((2, 0)), "binding {g} through the GUI proxy");
        assert!(ended, "the connection that bound {g} is closed");
    }
    // Another connection through the GUI proxy goes on meanwhile, and binds what is served.
    let (err, ended) = bind(&mut raw, via["wl_compositor"], "wl_compositor");
    assert_eq!((err, ended), (None, false));
}
