//! Weston's scene as `weston-debug scene-graph` prints it (weston run with `--debug`): each
//! view's role, client pid, window title and position on the output, and whether it has a
//! buffer. The text comes from weston in the GUI VM, but window titles in it come from
//! clients (app VMs): the parser is bounded, accepts only the line shapes below and never
//! panics, and a title is never trusted to say which VM a window belongs to.
//!
//! ```text
//! Layer 5 (pos 0x50000000):
//!     View 0 (role xdg_toplevel, PID 431, surface ID 3, top-level window 'simple-shm' of org.freedesktop.weston.simple-shm, 0x55…):
//!         position: (13, 174) -> (263, 424)
//!         [fully opaque]
//!         outputs: 0 (headless) (primary)
//!         SHM buffer
//! ```

/// Most views kept from one dump.
pub const MAX_VIEWS: usize = 256;

/// One view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct View {
    /// `xdg_toplevel`, `wl_pointer-cursor`, `(null)` (the shell's panel and background), …
    pub role: String,
    /// The client's pid in the GUI VM (the GUI proxy's, for every app VM's window).
    pub pid: i64,
    /// A top-level window's title, as the client set it.
    pub title: Option<String>,
    /// Top-left and bottom-right corners on the output (exclusive).
    pub x1: i32,
    pub y1: i32,
    pub x2: i32,
    pub y2: i32,
    /// Weston holds a buffer for it right now.
    pub has_buffer: bool,
    /// Weston's description of the view (`panel for output …`, `cursor`, …).
    pub desc: String,
}

impl View {
    /// A client's window that weston draws: desktop-shell puts a toplevel's view in its
    /// layer when the surface is mapped (its first commit with a buffer). Whether weston
    /// still holds the buffer says nothing (it lets go of a shm buffer it has drawn), and a
    /// closing window's view lingers with pid 0 for its animation.
    pub fn is_mapped_window(&self) -> bool {
        self.role == "xdg_toplevel" && self.pid > 0 && self.width() > 1 && self.height() > 1
    }

    /// The pointer's image (drawn while its view is in the cursor layer).
    pub fn is_cursor(&self) -> bool {
        self.role == "wl_pointer-cursor"
    }

    pub fn width(&self) -> i32 {
        self.x2.saturating_sub(self.x1)
    }

    pub fn height(&self) -> i32 {
        self.y2.saturating_sub(self.y1)
    }
}

/// A parsed dump.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scene {
    pub views: Vec<View>,
}

fn parse_view_line(line: &str) -> Option<View> {
    let rest = line.trim_start().strip_prefix("View ")?;
    let (_, rest) = rest.split_once(" (role ")?;
    let (role, rest) = rest.split_once(", PID ")?;
    let (pid, rest) = rest.split_once(',')?;
    let pid: i64 = pid.trim().parse().ok()?;
    let title = rest
        .find("top-level window '")
        .and_then(|i| rest.get(i + "top-level window '".len()..))
        .and_then(|t| {
            // The title ends at the last `'` before ` of ` or `, 0x` (a title may hold `'`).
            let end = t.rfind("' of ").or_else(|| t.rfind("', 0x"))?;
            t.get(..end).map(str::to_string)
        });
    let desc = rest
        .split_once(", ")
        .map(|(_, d)| d.rsplit_once(", 0x").map_or(d, |(d, _)| d))
        .unwrap_or_default()
        .to_string();
    Some(View {
        role: role.to_string(),
        pid,
        title,
        desc,
        ..View::default()
    })
}

fn parse_pair(s: &str) -> Option<(i32, i32)> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (a, b) = inner.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn parse_position(line: &str) -> Option<(i32, i32, i32, i32)> {
    let rest = line.trim_start().strip_prefix("position: ")?;
    let (a, b) = rest.split_once(" -> ")?;
    let (x1, y1) = parse_pair(a)?;
    let (x2, y2) = parse_pair(b)?;
    Some((x1, y1, x2, y2))
}

impl Scene {
    /// Parses a dump; lines it does not know are skipped.
    pub fn parse(text: &str) -> Scene {
        let mut views: Vec<View> = Vec::new();
        let mut current: Option<View> = None;
        for line in text.lines() {
            if let Some(v) = parse_view_line(line) {
                if let Some(done) = current.take() {
                    views.push(done);
                }
                if views.len() >= MAX_VIEWS {
                    break;
                }
                current = Some(v);
                continue;
            }
            let Some(v) = current.as_mut() else {
                continue;
            };
            if let Some((x1, y1, x2, y2)) = parse_position(line) {
                v.x1 = x1;
                v.y1 = y1;
                v.x2 = x2;
                v.y2 = y2;
            } else {
                let t = line.trim();
                if t.ends_with(" buffer") || t.starts_with("format: ") {
                    v.has_buffer = true;
                } else if t.starts_with("Layer ") || t.starts_with("Output ") {
                    if let Some(done) = current.take() {
                        views.push(done);
                    }
                }
            }
        }
        if let Some(done) = current.take() {
            if views.len() < MAX_VIEWS {
                views.push(done);
            }
        }
        Scene { views }
    }

    /// Mapped client windows, topmost first (weston prints layers and views top down).
    pub fn windows(&self) -> impl Iterator<Item = &View> {
        self.views.iter().filter(|v| v.is_mapped_window())
    }

    /// The mapped window titled `title`, if exactly one is.
    pub fn window(&self, title: &str) -> Option<&View> {
        let mut it = self.windows().filter(|v| v.title.as_deref() == Some(title));
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }

    /// desktop-shell is up: its background is there, and no nameless full-size view (the
    /// black curtain weston shows until the shell is ready, and its fade) covers the
    /// output.
    pub fn shell_ready(&self) -> bool {
        let background = self
            .views
            .iter()
            .any(|v| v.desc.starts_with("background for output"));
        let curtain = self.views.iter().any(|v| {
            v.pid == 0 && v.role == "(null)" && v.x1 <= 0 && v.y1 <= 0 && v.width() >= 320
        });
        background && !curtain
    }

    /// The pointer's image, when drawn.
    pub fn cursor(&self) -> Option<&View> {
        self.views.iter().find(|v| v.is_cursor())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What weston 10 printed on this machine (X11 backend on Xvfb, desktop-shell).
    const DUMP: &str = "Weston scene graph at 753.680908448:

Output 0 (screen0):
\tposition: (0, 0) -> (640, 480)
\tmode: 640x480@60.000Hz

Layer 1 (pos 0xfffffffe):
\tView 0 (role wl_pointer-cursor, PID 13993, surface ID 22, cursor, 0x56058e36c5e0):
\t\tposition: (319, 239) -> (329, 255)
\t\t[not opaque]
\t\toutputs: 0 (screen0) (primary)
\t\tSHM buffer
\t\t\tformat: 0x34325241 ARGB8888

Layer 3 (pos 0x80000000):
\tView 0 (role (null), PID 13993, surface ID 17, panel for output screen0, 0x56058e365360):
\t\tposition: (0, 0) -> (640, 32)
\t\t[not opaque]
\t\toutputs: 0 (screen0) (primary)
\t\t[buffer not available]

Layer 5 (pos 0x50000000):
\tView 0 (role xdg_toplevel, PID 0, surface ID 0, [no description available], 0x56058e36e6b0):
\t\tposition: (54, 375) -> (55, 376)
\t\t[not opaque]
\t\t[buffer not available]
\tView 1 (role xdg_toplevel, PID 14058, surface ID 3, top-level window 'simple-shm' of org.freedesktop.weston.simple-shm, 0x56058e36d0f0):
\t\tposition: (13, 174) -> (263, 424)
\t\t[fully opaque]
\t\toutputs: 0 (screen0) (primary)
\t\tSHM buffer
\t\t\tformat: 0x1 XRGB8888
\tView 2 (role xdg_toplevel, PID 14060, surface ID 5, top-level window 'it's mine' of x, 0x1):
\t\tposition: (-5, 40) -> (195, 240)
\t\tSHM buffer

Layer 6 (pos 0x2):
\tView 0 (role (null), PID 13993, surface ID 18, background for output screen0, 0x56058e36aaf0):
\t\tposition: (0, 0) -> (640, 480)
\t\t[fully opaque]
\t\t[buffer not available]
";

    #[test]
    fn windows_their_places_and_the_cursor() {
        let s = Scene::parse(DUMP);
        assert_eq!(s.views.len(), 6);
        let titles: Vec<&str> = s.windows().filter_map(|v| v.title.as_deref()).collect();
        assert_eq!(titles, ["simple-shm", "it's mine"]);
        let w = s.window("simple-shm").unwrap();
        assert_eq!((w.x1, w.y1, w.x2, w.y2), (13, 174, 263, 424));
        assert_eq!((w.width(), w.height()), (250, 250));
        assert_eq!(w.pid, 14058);
        let m = s.window("it's mine").unwrap();
        assert_eq!((m.x1, m.y1), (-5, 40));
        let c = s.cursor().unwrap();
        assert_eq!((c.x1, c.y1), (319, 239));
        assert!(s.window("Flower").is_none());
        assert!(s.shell_ready());
        assert_eq!(s.views[1].desc, "panel for output screen0");
        // Weston's black curtain before desktop-shell is ready.
        let curtain = DUMP.replace(
            "Layer 1 (pos 0xfffffffe):",
            "Layer 0 (pos 0xffffffff):\n\tView 0 (role (null), PID 0, surface ID 0, [no description available], 0x1):\n\t\tposition: (0, 0) -> (640, 480)\n\nLayer 1 (pos 0xfffffffe):",
        );
        assert!(!Scene::parse(&curtain).shell_ready());
    }

    #[test]
    fn two_windows_with_one_title_name_neither() {
        let twice = format!(
            "{DUMP}\tView 3 (role xdg_toplevel, PID 9, surface ID 9, top-level window 'simple-shm' of y, 0x2):\n\t\tposition: (0, 0) -> (10, 10)\n\t\tSHM buffer\n"
        );
        assert!(Scene::parse(&twice).window("simple-shm").is_none());
    }

    proptest! {
        #[test]
        fn any_text_parses_without_panic(text in "(View |position: |\\(|\\)|, | -> |PID |role |'|\\n|\\t|[0-9a-z_-]){0,200}") {
            let s = Scene::parse(&text);
            prop_assert!(s.views.len() <= MAX_VIEWS);
        }
    }
}
