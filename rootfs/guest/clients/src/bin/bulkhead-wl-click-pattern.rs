//! `bulkhead-wl-click-pattern`: a window with an exact picture (`bulkhead_desktop::pattern`) for
//! pixel checks. When the window is clicked, one rectangle of it changes, committed with
//! damage for that rectangle only; once its frame is done the client says how many bytes the
//! app-side proxy copied for that commit (the proxy's `--stats-file`, `last_commit_bytes`).
//! It then keeps the window open until the compositor closes it or the VM stops.

use bulkhead_desktop::pattern::{self, CHANGED, HEIGHT, TITLE, WIDTH};
use bulkhead_wl_clients::{Res, Window};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "bulkhead-wl-click-pattern",
    about = "A window with an exact pattern for pixel and damage checks"
)]
struct Cli {
    /// The app-side proxy's statistics file.
    #[arg(long)]
    stats_file: Option<std::path::PathBuf>,
}

fn stat(path: &std::path::Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('=')?.trim().parse().ok())
}

fn run(cli: &Cli) -> Res<()> {
    let mut w = Window::open(TITLE, WIDTH, HEIGHT, true)?;
    w.write(0, &pattern::xrgb8888(false))?;
    w.commit_and_wait((0, 0, WIDTH, HEIGHT))?;
    if !w.has_pointer() {
        println!("mapped {WIDTH}x{HEIGHT}; the compositor has no seat, so no click can come");
        while !w.state.events.close {
            w.dispatch()?;
        }
        return Ok(());
    }
    println!("mapped {WIDTH}x{HEIGHT}, waiting for a click");
    while w.state.events.clicks == 0 {
        if w.state.events.close {
            return Ok(());
        }
        w.dispatch()?;
    }
    let changed = pattern::xrgb8888(true);
    let (cx, cy, cw, ch) = CHANGED;
    for y in cy..cy + ch {
        let start = ((y * WIDTH + cx) * 4) as usize;
        let row = changed
            .get(start..start + (cw * 4) as usize)
            .ok_or("pattern row out of range")?;
        w.write(start as u64, row)?;
    }
    w.commit_and_wait(CHANGED)?;
    let copied = cli
        .stats_file
        .as_deref()
        .and_then(|p| stat(p, "last_commit_bytes"));
    match copied {
        Some(n) => println!(
            "clicked: changed rectangle ({cx}, {cy}) {cw}x{ch}; the proxy copied {n} bytes for that commit"
        ),
        None => println!("clicked: changed rectangle ({cx}, {cy}) {cw}x{ch}"),
    }
    while !w.state.events.close {
        w.dispatch()?;
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
