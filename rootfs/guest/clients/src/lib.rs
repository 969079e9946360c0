//! One shared-memory window, the plumbing both of Bulkhead's test clients use: the globals
//! (`wl_compositor`, `wl_shm`, `xdg_wm_base`, optionally `wl_seat`), an xdg-shell toplevel,
//! one buffer in a memfd (written with `pwrite`, so no mapping and no `unsafe`), frame
//! callbacks, and the pointer's enter (the cursor is hidden over the window) and button
//! events. The clients are ordinary Wayland clients: they talk to whatever
//! `$WAYLAND_DISPLAY` is, a compositor or Bulkhead's app-side proxy.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use wayland_client::globals::{registry_queue_init, GlobalListContents};
use wayland_client::protocol::{
    wl_buffer, wl_callback, wl_compositor, wl_pointer, wl_registry, wl_seat, wl_shm, wl_shm_pool,
    wl_surface,
};
use wayland_client::{Connection, Dispatch, EventQueue, QueueHandle, WEnum};
use wayland_protocols::xdg::shell::client::{xdg_surface, xdg_toplevel, xdg_wm_base};

/// What happened since the caller last looked.
#[derive(Debug, Default)]
pub struct Events {
    /// The surface was configured (the window may be drawn).
    pub configured: bool,
    /// Frame callbacks done since the last look.
    pub frames_done: u32,
    /// Button presses on the window.
    pub clicks: u32,
    /// The compositor asked the window to close.
    pub close: bool,
}

/// The client's state, as the dispatchers see it.
pub struct State {
    pub events: Events,
    pointer: Option<wl_pointer::WlPointer>,
}

/// A window of `width`×`height` XRGB8888 pixels.
pub struct Window {
    pub conn: Connection,
    pub queue: EventQueue<State>,
    pub state: State,
    qh: QueueHandle<State>,
    surface: wl_surface::WlSurface,
    buffer: wl_buffer::WlBuffer,
    memory: File,
    pub width: u32,
    pub height: u32,
    _xdg_surface: xdg_surface::XdgSurface,
    _toplevel: xdg_toplevel::XdgToplevel,
    _pool: wl_shm_pool::WlShmPool,
}

/// Any failure, in words.
pub type Res<T> = Result<T, String>;

impl Window {
    /// Whether the window has a pointer (`open` asked for one and the compositor has a seat).
    pub fn has_pointer(&self) -> bool {
        self.state.pointer.is_some()
    }

    /// Connects to `$WAYLAND_DISPLAY`, makes the window and waits for its first configure.
    pub fn open(title: &str, width: u32, height: u32, with_seat: bool) -> Res<Window> {
        let conn = connect()?;
        let (globals, queue) =
            registry_queue_init::<State>(&conn).map_err(|e| format!("registry: {e}"))?;
        let qh = queue.handle();
        let compositor: wl_compositor::WlCompositor = globals
            .bind(&qh, 1..=4, ())
            .map_err(|e| format!("wl_compositor: {e}"))?;
        let shm: wl_shm::WlShm = globals
            .bind(&qh, 1..=1, ())
            .map_err(|e| format!("wl_shm: {e}"))?;
        let wm: xdg_wm_base::XdgWmBase = globals
            .bind(&qh, 1..=1, ())
            .map_err(|e| format!("xdg_wm_base: {e}"))?;
        let mut state = State {
            events: Events::default(),
            pointer: None,
        };
        // A compositor without input devices (weston on a screen with none) has no seat:
        // the window still maps, it just cannot be clicked.
        if with_seat {
            if let Ok(seat) = globals.bind::<wl_seat::WlSeat, _, _>(&qh, 1..=5, ()) {
                state.pointer = Some(seat.get_pointer(&qh, ()));
            }
        }
        let stride = width * 4;
        let size = stride * height;
        let memory = memfd("bulkhead-window")?;
        memory
            .set_len(u64::from(size))
            .map_err(|e| format!("memfd: {e}"))?;
        let pool = shm.create_pool(memory.as_fd(), size as i32, &qh, ());
        let buffer = pool.create_buffer(
            0,
            width as i32,
            height as i32,
            stride as i32,
            wl_shm::Format::Xrgb8888,
            &qh,
            (),
        );
        let surface = compositor.create_surface(&qh, ());
        let xdg_surface = wm.get_xdg_surface(&surface, &qh, ());
        let toplevel = xdg_surface.get_toplevel(&qh, ());
        toplevel.set_title(title.to_string());
        toplevel.set_app_id(format!("org.bulkhead.{title}"));
        surface.commit();
        let mut w = Window {
            conn,
            queue,
            state,
            qh,
            surface,
            buffer,
            memory,
            width,
            height,
            _xdg_surface: xdg_surface,
            _toplevel: toplevel,
            _pool: pool,
        };
        while !w.state.events.configured {
            w.dispatch()?;
        }
        Ok(w)
    }

    /// Blocks until at least one event has been handled.
    pub fn dispatch(&mut self) -> Res<()> {
        self.queue
            .blocking_dispatch(&mut self.state)
            .map(|_| ())
            .map_err(|e| format!("dispatch: {e}"))
    }

    /// Writes `bytes` (XRGB8888 rows) into the buffer at byte `offset`.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Res<()> {
        self.memory
            .write_all_at(bytes, offset)
            .map_err(|e| format!("pwrite: {e}"))
    }

    /// Attaches the buffer, damages `rect` (buffer pixels: x, y, w, h), asks for a frame
    /// callback and commits.
    pub fn commit(&mut self, rect: (u32, u32, u32, u32)) {
        self.surface.attach(Some(&self.buffer), 0, 0);
        let (x, y, w, h) = rect;
        if self.surface.version() >= 4 {
            self.surface
                .damage_buffer(x as i32, y as i32, w as i32, h as i32);
        } else {
            self.surface.damage(x as i32, y as i32, w as i32, h as i32);
        }
        self.surface.frame(&self.qh, ());
        self.surface.commit();
    }

    /// Commits `rect` and waits for its frame callback.
    pub fn commit_and_wait(&mut self, rect: (u32, u32, u32, u32)) -> Res<()> {
        self.state.events.frames_done = 0;
        self.commit(rect);
        let _ = self.conn.flush();
        while self.state.events.frames_done == 0 {
            if self.state.events.close {
                return Err("the compositor closed the window".into());
            }
            self.dispatch()?;
        }
        Ok(())
    }
}

/// Connects as libwayland does: `$WAYLAND_DISPLAY` (default `wayland-0`) in
/// `$XDG_RUNTIME_DIR`, or an absolute path.
fn connect() -> Res<Connection> {
    if std::env::var_os("WAYLAND_DISPLAY").is_some() || std::env::var_os("WAYLAND_SOCKET").is_some()
    {
        return Connection::connect_to_env().map_err(|e| format!("connect: {e}"));
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR").ok_or("connect: XDG_RUNTIME_DIR is not set")?;
    let path = std::path::Path::new(&dir).join("wayland-0");
    let stream = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| format!("connect {}: {e}", path.display()))?;
    Connection::from_socket(stream).map_err(|e| format!("connect: {e}"))
}

fn memfd(name: &str) -> Res<File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).map_err(|e| format!("memfd_create: {e}"))?;
    Ok(File::from(fd))
}

use wayland_client::Proxy;

impl Dispatch<wl_registry::WlRegistry, GlobalListContents> for State {
    fn event(
        _: &mut Self,
        _: &wl_registry::WlRegistry,
        _: wl_registry::Event,
        _: &GlobalListContents,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
    }
}

impl Dispatch<xdg_wm_base::XdgWmBase, ()> for State {
    fn event(
        _: &mut Self,
        wm: &xdg_wm_base::XdgWmBase,
        event: xdg_wm_base::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_wm_base::Event::Ping { serial } = event {
            wm.pong(serial);
        }
    }
}

impl Dispatch<xdg_surface::XdgSurface, ()> for State {
    fn event(
        state: &mut Self,
        s: &xdg_surface::XdgSurface,
        event: xdg_surface::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_surface::Event::Configure { serial } = event {
            s.ack_configure(serial);
            state.events.configured = true;
        }
    }
}

impl Dispatch<xdg_toplevel::XdgToplevel, ()> for State {
    fn event(
        state: &mut Self,
        _: &xdg_toplevel::XdgToplevel,
        event: xdg_toplevel::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_toplevel::Event::Close = event {
            state.events.close = true;
        }
    }
}

impl Dispatch<wl_callback::WlCallback, ()> for State {
    fn event(
        state: &mut Self,
        _: &wl_callback::WlCallback,
        event: wl_callback::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_callback::Event::Done { .. } = event {
            state.events.frames_done += 1;
        }
    }
}

impl Dispatch<wl_pointer::WlPointer, ()> for State {
    fn event(
        state: &mut Self,
        p: &wl_pointer::WlPointer,
        event: wl_pointer::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        match event {
            // No cursor image over the window: the pixels under it stay the window's.
            wl_pointer::Event::Enter { serial, .. } => p.set_cursor(serial, None, 0, 0),
            wl_pointer::Event::Button {
                state: WEnum::Value(wl_pointer::ButtonState::Pressed),
                ..
            } => state.events.clicks += 1,
            _ => {}
        }
        let _ = &state.pointer;
    }
}

macro_rules! no_events {
    ($($t:ty),*) => {$(
        impl Dispatch<$t, ()> for State {
            fn event(
                _: &mut Self,
                _: &$t,
                _: <$t as Proxy>::Event,
                _: &(),
                _: &Connection,
                _: &QueueHandle<Self>,
            ) {
            }
        }
    )*};
}

no_events!(
    wl_compositor::WlCompositor,
    wl_shm::WlShm,
    wl_shm_pool::WlShmPool,
    wl_buffer::WlBuffer,
    wl_surface::WlSurface,
    wl_seat::WlSeat
);
