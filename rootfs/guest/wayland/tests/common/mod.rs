//! Helpers for the tests with real weston and real stock clients: weston in a private
//! runtime directory, both proxies joined by the stand-in transport (socketpairs and memfds
//! in place of virtio_wl), screenshots.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_wayland::app::{self, Config};
use bulkhead_wayland::gui;
use bulkhead_wayland::stats::Stats;
use bulkhead_wayland::transport::standin::StandIn;

/// Fails (never skips) when a Debian program the tests need is not installed.
pub fn need(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is missing: install Debian's {package} (`cargo run -p bulkhead-rootfs -- provision` does)"
    );
}

pub fn runtime_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("bulkhead-wl-test")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// A weston started by this test (killed by its pid on drop).
pub struct Weston {
    child: Child,
    xvfb: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

fn wait_socket(p: &Path, child: &mut Child, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(p).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early: {st}");
        }
        assert!(
            Instant::now() < until,
            "{what} did not open {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Weston {
    /// The headless backend with the pixman renderer, as in gui-vm.
    pub fn headless() -> Self {
        need("weston", "weston");
        let dir = runtime_dir();
        let mut child = Command::new("weston")
            .args([
                "--backend=headless-backend.so",
                "--use-pixman",
                "--width=640",
                "--height=480",
                "--socket=compositor",
                "--idle-time=0",
                "--debug",
            ])
            .env("XDG_RUNTIME_DIR", dir.path())
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("DISPLAY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weston");
        let socket = dir.path().join("compositor");
        wait_socket(&socket, &mut child, "weston");
        let w = Self {
            child,
            xvfb: None,
            dir,
            socket,
        };
        w.wait_desktop();
        w
    }

    /// weston's X11 backend on a private Xvfb: the same weston with a seat (keyboard and
    /// pointer), which the headless backend does not have; keymaps and the clipboard need
    /// one.
    pub fn with_seat() -> Self {
        need("weston", "weston");
        need("Xvfb", "xvfb");
        let dir = runtime_dir();
        let (r, w) = bulkhead_wayland::sock::pipe().unwrap();
        let mut xvfb = Command::new("Xvfb");
        xvfb.args([
            "-displayfd",
            "3",
            "-screen",
            "0",
            "800x600x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
        let mut xvfb = {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let wfd = w.as_raw_fd();
            // SAFETY: dup2 in the child before exec, on an fd that is open in it.
            unsafe {
                xvfb.pre_exec(move || {
                    if libc::dup2(wfd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            xvfb.spawn().expect("start Xvfb")
        };
        drop(w);
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(std::fs::File::from(r)),
            &mut line,
        )
        .unwrap();
        let display = format!(":{}", line.trim());
        assert!(
            line.trim().parse::<u32>().is_ok(),
            "Xvfb gave no display: {line:?}"
        );
        let _ = xvfb.try_wait();
        let mut child = Command::new("weston")
            .args([
                "--backend=x11-backend.so",
                "--use-pixman",
                "--width=640",
                "--height=480",
                "--socket=compositor",
                "--idle-time=0",
                "--debug",
            ])
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("DISPLAY", &display)
            .env_remove("WAYLAND_DISPLAY")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weston");
        let socket = dir.path().join("compositor");
        wait_socket(&socket, &mut child, "weston");
        let w = Self {
            child,
            xvfb: Some(xvfb),
            dir,
            socket,
        };
        w.wait_desktop();
        w
    }

    /// Waits until desktop-shell has drawn the desktop and its fade-in is over: two
    /// pictures in a row alike and not black (until then weston shows black, then a dimmed
    /// desktop, and windows dimmed too).
    fn wait_desktop(&self) {
        let mut last: Option<Image> = None;
        wait_for("weston's desktop", 60, || {
            let img = self.screenshot();
            let settled = img.rgba.chunks(4).any(|p| p[..3] != [0, 0, 0])
                && last.as_ref().is_some_and(|l| l.diff(&img) == 0);
            last = Some(img);
            settled
        });
    }

    /// A screenshot of weston's output (taken directly on weston's socket, not through the
    /// proxies), as RGBA rows.
    pub fn screenshot(&self) -> Image {
        need("weston-screenshooter", "weston");
        let out = tempfile::tempdir().unwrap();
        let st = Command::new("weston-screenshooter")
            .current_dir(out.path())
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env("WAYLAND_DISPLAY", &self.socket)
            .status()
            .unwrap();
        assert!(st.success(), "weston-screenshooter failed");
        let f = std::fs::read_dir(out.path())
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "png"))
            .expect("no screenshot written");
        // BULKHEAD_WL_TEST_SHOTS=DIR keeps every screenshot there, to look at.
        if let Some(dir) = std::env::var_os("BULKHEAD_WL_TEST_SHOTS") {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("{}-{n}.png", std::process::id());
            let _ = std::fs::copy(f.path(), std::path::Path::new(&dir).join(name));
        }
        Image::load(&f.path())
    }
}

impl Drop for Weston {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the weston this test started (its pid), so it ends its clients.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(x) = &mut self.xvfb {
            let _ = x.kill();
            let _ = x.wait();
        }
    }
}

/// A decoded PNG.
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgba: Vec<u8>,
}

impl Image {
    pub fn load(p: &Path) -> Self {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        let (w, h) = (info.width as usize, info.height as usize);
        let ch = match info.color_type {
            png::ColorType::Rgba => 4,
            png::ColorType::Rgb => 3,
            c => panic!("unexpected PNG colour type {c:?}"),
        };
        let mut rgba = Vec::with_capacity(w * h * 4);
        for px in buf[..w * h * ch].chunks(ch) {
            rgba.extend_from_slice(&[px[0], px[1], px[2], if ch == 4 { px[3] } else { 255 }]);
        }
        Self {
            width: w,
            height: h,
            rgba,
        }
    }

    pub fn px(&self, x: usize, y: usize) -> [u8; 4] {
        let i = (y * self.width + x) * 4;
        [
            self.rgba[i],
            self.rgba[i + 1],
            self.rgba[i + 2],
            self.rgba[i + 3],
        ]
    }

    /// Pixels that differ from `other` (same size).
    pub fn diff(&self, other: &Image) -> usize {
        assert_eq!((self.width, self.height), (other.width, other.height));
        self.rgba
            .chunks(4)
            .zip(other.rgba.chunks(4))
            .filter(|(a, b)| a[..3] != b[..3])
            .count()
    }
}

/// Both proxies over one stand-in transport: the GUI side joined to `weston`, one app side
/// per entry of `apps` (each its own "VM": its own runtime directory and socket).
pub struct Proxies {
    pub transport: StandIn,
    pub apps: Vec<AppSide>,
}

pub struct AppSide {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub stats: Arc<Stats>,
}

impl AppSide {
    /// A stock client command connected to this app side's socket.
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("XDG_RUNTIME_DIR", self.dir.path())
            .env("WAYLAND_DISPLAY", "wayland-0")
            .env_remove("DISPLAY");
        c
    }
}

pub fn proxies(weston: &Weston, n_apps: usize) -> Proxies {
    let _ = env_logger_init();
    let t = StandIn::new();
    let acceptor = t.listen("wayland");
    let (gt, sock) = (Arc::new(t.clone()), weston.socket.clone());
    std::thread::spawn(move || gui::serve(acceptor, gt, sock, Duration::from_secs(10)));
    let apps = (0..n_apps)
        .map(|_| app_side(&t, "wayland@gui-vm"))
        .collect();
    Proxies { transport: t, apps }
}

pub fn app_side(t: &StandIn, connect: &str) -> AppSide {
    let dir = runtime_dir();
    let socket = dir.path().join("wayland-0");
    let listener = UnixListener::bind(&socket).unwrap();
    let stats = Arc::new(Stats::default());
    let (at, s) = (Arc::new(t.clone()), stats.clone());
    let cfg = Config {
        connect: connect.into(),
        max_clients: 16,
    };
    std::thread::spawn(move || app::serve(listener, at, s, cfg));
    AppSide { dir, socket, stats }
}

fn env_logger_init() -> Result<(), ()> {
    bulkhead_wayland::init_logging();
    Ok(())
}

/// Waits until `f` holds (bounded; the machine is slow and shared).
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills a client this test started, by its pid.
pub fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}
