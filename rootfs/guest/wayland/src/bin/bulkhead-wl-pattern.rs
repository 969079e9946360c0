//! bulkhead-wl-pattern: a small Wayland test client that draws an exact, known pattern, so a
//! screenshot can be checked pixel by pixel (and the proxy's copy counter against a known
//! damage).
//!
//! It connects to `$WAYLAND_DISPLAY` (in `$XDG_RUNTIME_DIR`), maps one xdg toplevel of
//! `--width`×`--height` (default 200×150) from one XRGB8888 shm buffer, and draws four
//! quadrants: red top left, green top right, blue bottom left, yellow bottom right (pure
//! colours, e.g. `ff0000`). It commits with the whole buffer damaged and prints
//! `frame 1 shown` once the compositor's frame callback says it was drawn. With `--damage
//! X,Y,W,H` it then waits `--pause` seconds, fills that rectangle with magenta (`ff00ff`),
//! damages only it, commits and prints `frame 2 shown (damage X,Y,W,H)`. It then keeps the
//! window for `--hold` seconds (default: until killed). It speaks the protocol through this
//! crate's wire format and tables; one buffer, so a proxy copies exactly the damage.

#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_wayland::protocol::{interface, message_named};
use bulkhead_wayland::sock;
use bulkhead_wayland::wire::{self, Arg};

/// Quadrant colours (0xRRGGBB) and the damage colour.
const COLOURS: [u32; 4] = [0xff0000, 0x00ff00, 0x0000ff, 0xffff00];
const DAMAGE: u32 = 0xff00ff;

#[derive(clap::Parser, Debug)]
#[command(
    version,
    about = "Wayland test client: an exact four-colour pattern, then one damaged rectangle"
)]
struct Cli {
    /// Width in pixels.
    #[arg(long, default_value_t = 200)]
    width: u32,
    /// Height in pixels.
    #[arg(long, default_value_t = 150)]
    height: u32,
    /// After frame 1, fill X,Y,W,H with magenta and commit only that damage.
    #[arg(long, value_parser = parse_rect)]
    damage: Option<[u32; 4]>,
    /// Seconds between frame 1 and frame 2.
    #[arg(long, default_value_t = 1)]
    pause: u64,
    /// Draw frame 2 when a line arrives on standard input instead of after `--pause`.
    #[arg(long)]
    pause_stdin: bool,
    /// Seconds to keep the window after the last frame (default: until killed).
    #[arg(long)]
    hold: Option<u64>,
}

fn parse_rect(s: &str) -> Result<[u32; 4], String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>().map_err(|e| format!("{p}: {e}")))
        .collect::<Result<_, _>>()?;
    <[u32; 4]>::try_from(v).map_err(|_| "X,Y,W,H".to_string())
}

/// The pattern's colour at (x, y) of a w×h window (0xRRGGBB), before any damage.
fn colour(x: u32, y: u32, w: u32, h: u32) -> u32 {
    let q = usize::from(x >= w / 2) + 2 * usize::from(y >= h / 2);
    COLOURS.get(q).copied().unwrap_or(0)
}

struct Conn {
    sock: UnixStream,
    bytes: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

fn op(iface: &str, name: &str, request: bool) -> Result<u16, String> {
    let i = interface(iface).ok_or(format!("no {iface}"))?;
    message_named(if request { i.requests } else { i.events }, name)
        .map(|(o, _)| o)
        .ok_or(format!("no {iface}.{name}"))
}

impl Conn {
    fn req(
        &self,
        obj: u32,
        iface: &str,
        name: &str,
        args: &[Arg<'_>],
        fd: Option<&OwnedFd>,
    ) -> Result<(), String> {
        let m = wire::encode(obj, op(iface, name, true)?, args);
        let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
        sock::send_all(self.sock.as_fd(), &m, &fds).map_err(|e| format!("send: {e}"))
    }

    /// The next event: (object, opcode, body).
    fn event(&mut self) -> Result<(u32, u16, Vec<u8>), String> {
        loop {
            if let Some(h) = wire::header(&self.bytes).map_err(|e| e.to_string())? {
                if self.bytes.len() >= h.size {
                    let m: Vec<u8> = self.bytes.drain(..h.size).collect();
                    return Ok((h.object, h.opcode, m.get(8..).unwrap_or_default().to_vec()));
                }
            }
            let mut buf = vec![0u8; 4096];
            let (n, fds) = sock::recv_with_fds(self.sock.as_fd(), &mut buf, false)
                .map_err(|e| format!("recv: {e}"))?;
            if n == 0 && fds.is_empty() {
                return Err("the compositor closed the connection".into());
            }
            self.bytes
                .extend_from_slice(buf.get(..n).unwrap_or_default());
            self.fds.extend(fds);
        }
    }
}

// Object ids, in the order they are created (libwayland wants new client ids in sequence).
const DISPLAY: u32 = 1;
const REGISTRY: u32 = 2;
const SYNC: u32 = 3;
const COMPOSITOR: u32 = 4;
const SHM: u32 = 5;
const WM_BASE: u32 = 6;
const SURFACE: u32 = 7;
const XDG_SURFACE: u32 = 8;
const TOPLEVEL: u32 = 9;
const POOL: u32 = 10;
const BUFFER: u32 = 11;
/// Frame callbacks (one at a time; the id is reused once the compositor deleted it).
const FRAME: u32 = 12;

fn uint_at(body: &[u8], i: usize) -> u32 {
    body.get(i * 4..i * 4 + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Handles events until `until` says stop; answers pings and configures on the way.
fn dispatch(c: &mut Conn, mut until: impl FnMut(u32, u16, &[u8]) -> bool) -> Result<(), String> {
    let (ping, configure, error) = (
        op("xdg_wm_base", "ping", false)?,
        op("xdg_surface", "configure", false)?,
        op("wl_display", "error", false)?,
    );
    loop {
        let (obj, opc, body) = c.event()?;
        if obj == DISPLAY && opc == error {
            let msg = String::from_utf8_lossy(body.get(12..).unwrap_or_default()).into_owned();
            return Err(format!("protocol error: {}", msg.trim_end_matches('\0')));
        }
        if obj == WM_BASE && opc == ping {
            c.req(
                WM_BASE,
                "xdg_wm_base",
                "pong",
                &[Arg::Uint(uint_at(&body, 0))],
                None,
            )?;
        }
        if obj == XDG_SURFACE && opc == configure {
            c.req(
                XDG_SURFACE,
                "xdg_surface",
                "ack_configure",
                &[Arg::Uint(uint_at(&body, 0))],
                None,
            )?;
        }
        if until(obj, opc, &body) {
            return Ok(());
        }
    }
}

fn memfd(len: usize) -> Result<OwnedFd, String> {
    // SAFETY: a static NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(c"bulkhead-wl-pattern".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd nothing else owns.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64).map_err(|e| e.to_string())?;
    Ok(OwnedFd::from(f))
}

/// Writes the XRGB8888 pixels of `rect` (X, Y, W, H) into the pool through its fd.
fn paint(
    fd: &OwnedFd,
    w: u32,
    h: u32,
    rect: [u32; 4],
    f: impl Fn(u32, u32) -> u32,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
    let [x0, y0, rw, rh] = rect;
    for y in y0..(y0 + rh).min(h) {
        let row: Vec<u8> = (x0..(x0 + rw).min(w))
            .flat_map(|x| {
                let c = f(x, y);
                [
                    (c & 0xff) as u8,
                    (c >> 8 & 0xff) as u8,
                    (c >> 16 & 0xff) as u8,
                    0xff,
                ]
            })
            .collect();
        file.write_all_at(&row, u64::from(y * w * 4 + x0 * 4))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn frame(c: &mut Conn, damage: [u32; 4]) -> Result<(), String> {
    let [x, y, w, h] = damage.map(|v| v as i32);
    c.req(
        SURFACE,
        "wl_surface",
        "attach",
        &[Arg::Object(BUFFER), Arg::Int(0), Arg::Int(0)],
        None,
    )?;
    c.req(
        SURFACE,
        "wl_surface",
        "damage_buffer",
        &[Arg::Int(x), Arg::Int(y), Arg::Int(w), Arg::Int(h)],
        None,
    )?;
    c.req(SURFACE, "wl_surface", "frame", &[Arg::NewId(FRAME)], None)?;
    c.req(SURFACE, "wl_surface", "commit", &[], None)?;
    let done = op("wl_callback", "done", false)?;
    let delete_id = op("wl_display", "delete_id", false)?;
    dispatch(c, |o, opc, _| o == FRAME && opc == done)?;
    // The callback's id is free again once the compositor deletes it.
    dispatch(c, |o, opc, b| {
        o == DISPLAY && opc == delete_id && uint_at(b, 0) == FRAME
    })
}

fn run(cli: &Cli) -> Result<(), String> {
    let (w, h) = (cli.width.max(2), cli.height.max(2));
    let dir = std::env::var_os("XDG_RUNTIME_DIR").ok_or("XDG_RUNTIME_DIR is not set")?;
    let name = std::env::var_os("WAYLAND_DISPLAY").unwrap_or_else(|| "wayland-0".into());
    let path = PathBuf::from(dir).join(name);
    let sock = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut c = Conn {
        sock,
        bytes: Vec::new(),
        fds: VecDeque::new(),
    };
    c.req(
        DISPLAY,
        "wl_display",
        "get_registry",
        &[Arg::NewId(REGISTRY)],
        None,
    )?;
    c.req(DISPLAY, "wl_display", "sync", &[Arg::NewId(SYNC)], None)?;
    let global = op("wl_registry", "global", false)?;
    let mut globals: Vec<(u32, String, u32)> = Vec::new();
    let done = op("wl_callback", "done", false)?;
    dispatch(&mut c, |o, opc, b| {
        if o == REGISTRY && opc == global {
            let sig = interface("wl_registry")
                .map(|i| i.events)
                .and_then(|e| e.first());
            if let Some(Ok(args)) = sig.map(|m| wire::parse_args(m.signature, b)) {
                if let [Arg::Uint(n), Arg::Str(Some(s)), Arg::Uint(v)] = args[..] {
                    globals.push((n, String::from_utf8_lossy(s).into_owned(), v));
                }
            }
        }
        o == SYNC && opc == done
    })?;
    let delete_id = op("wl_display", "delete_id", false)?;
    dispatch(&mut c, |o, opc, b| {
        o == DISPLAY && opc == delete_id && uint_at(b, 0) == SYNC
    })?;
    for (id, iface, version) in [
        (COMPOSITOR, "wl_compositor", 4),
        (SHM, "wl_shm", 1),
        (WM_BASE, "xdg_wm_base", 1),
    ] {
        let (n, _, v) = globals
            .iter()
            .find(|g| g.1 == iface)
            .ok_or(format!("the compositor offers no {iface}"))?;
        c.req(
            REGISTRY,
            "wl_registry",
            "bind",
            &[
                Arg::Uint(*n),
                Arg::Str(Some(iface.as_bytes())),
                Arg::Uint((*v).min(version)),
                Arg::NewId(id),
            ],
            None,
        )?;
    }
    c.req(
        COMPOSITOR,
        "wl_compositor",
        "create_surface",
        &[Arg::NewId(SURFACE)],
        None,
    )?;
    c.req(
        WM_BASE,
        "xdg_wm_base",
        "get_xdg_surface",
        &[Arg::NewId(XDG_SURFACE), Arg::Object(SURFACE)],
        None,
    )?;
    c.req(
        XDG_SURFACE,
        "xdg_surface",
        "get_toplevel",
        &[Arg::NewId(TOPLEVEL)],
        None,
    )?;
    c.req(
        TOPLEVEL,
        "xdg_toplevel",
        "set_title",
        &[Arg::Str(Some(b"bulkhead-pattern"))],
        None,
    )?;
    c.req(SURFACE, "wl_surface", "commit", &[], None)?;
    let configure = op("xdg_surface", "configure", false)?;
    dispatch(&mut c, |o, opc, _| o == XDG_SURFACE && opc == configure)?;
    let size = (w * h * 4) as usize;
    let pool = memfd(size)?;
    paint(&pool, w, h, [0, 0, w, h], |x, y| colour(x, y, w, h))?;
    c.req(
        SHM,
        "wl_shm",
        "create_pool",
        &[Arg::NewId(POOL), Arg::Fd, Arg::Int(size as i32)],
        Some(&pool),
    )?;
    c.req(
        POOL,
        "wl_shm_pool",
        "create_buffer",
        &[
            Arg::NewId(BUFFER),
            Arg::Int(0),
            Arg::Int(w as i32),
            Arg::Int(h as i32),
            Arg::Int((w * 4) as i32),
            Arg::Uint(1),
        ],
        None,
    )?;
    frame(&mut c, [0, 0, w, h])?;
    println!("frame 1 shown ({w}x{h})");
    if let Some(d) = cli.damage {
        if cli.pause_stdin {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
        } else {
            std::thread::sleep(Duration::from_secs(cli.pause));
        }
        paint(&pool, w, h, d, |_, _| DAMAGE)?;
        frame(&mut c, d)?;
        println!("frame 2 shown (damage {},{},{},{})", d[0], d[1], d[2], d[3]);
    }
    let until = cli.hold.map(|s| Instant::now() + Duration::from_secs(s));
    // Keep the window: answer pings until the time is up (or forever).
    loop {
        if until.is_some_and(|t| Instant::now() >= t) {
            return Ok(());
        }
        let r = sock::poll(&[(c.sock.as_fd(), libc::POLLIN)], 200).map_err(|e| e.to_string())?;
        if r.first().copied().unwrap_or(0) != 0 {
            dispatch(&mut c, |_, _, _| true)?;
        }
    }
}

fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-wl-pattern: {e}");
            ExitCode::FAILURE
        }
    }
}
