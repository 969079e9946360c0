//! Raw mode for an interactive console: when stdin is a terminal, keys go to the guest as
//! typed (no line editing, no local echo, ctrl-C reaches the guest). The previous settings
//! come back when the guard is dropped.

/// Restores the terminal's settings on drop.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; None otherwise (a pipe, a file, /dev/null).
    pub fn enable() -> Option<Self> {
        // SAFETY: isatty only inspects descriptor 0.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the VMM's own log lines still end lines properly.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: sets the attributes of descriptor 0 from a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved from the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
