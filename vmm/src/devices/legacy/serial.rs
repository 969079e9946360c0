//! COM1: a 16550A UART (vm-superio) on ports 0x3f8..0x3ff whose interrupt reaches IOAPIC pin 4
//! through an irqfd. Output goes to any writer (stdout or a file); input comes from a reader
//! thread that feeds the receive FIFO.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// The serial interrupt line: an eventfd bound to the UART's GSI with an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes: a writer, a line at a time or byte by byte.
pub type SerialOut = LineOut;

/// Longest piece of one unterminated line held back.
const MAX_PENDING: usize = 4096;

/// The guest's console output, written a line at a time. vm-superio flushes after every
/// byte; written through as it comes, a reader of the pipe (the host init, which prefixes
/// each line with the VM's name) would see the VMM's own log lines land in the middle of a
/// guest line. `LineOut` ignores those flushes and writes whole lines (a longer one in
/// `MAX_PENDING` pieces); the rest of a last, unterminated line is written by
/// [`LineOut::finish`] (at VM end) or on drop. On a terminal (an interactive console, where
/// a prompt has no newline) output goes through byte by byte instead ([`LineOut::through`]).
pub struct LineOut {
    inner: Box<dyn Write + Send>,
    pending: Vec<u8>,
    whole_lines: bool,
}

impl LineOut {
    /// Whole lines (for pipes and files).
    pub fn lines(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            whole_lines: true,
        }
    }

    /// Every byte as it comes (for a terminal).
    pub fn through(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            whole_lines: false,
        }
    }

    /// Writes what is held back and flushes the destination.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let held = std::mem::take(&mut self.pending);
            self.inner.write_all(&held)?;
        }
        self.inner.flush()
    }
}

impl Write for LineOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.whole_lines {
            return self.inner.write(buf);
        }
        self.pending.extend_from_slice(buf);
        // Up to the last complete line; everything if what would stay is too long.
        let mut cut = self
            .pending
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |nl| nl + 1);
        if self.pending.len() - cut >= MAX_PENDING {
            cut = self.pending.len();
        }
        if cut > 0 {
            let rest = self.pending.split_off(cut);
            let out = std::mem::replace(&mut self.pending, rest);
            self.inner.write_all(&out)?;
            self.inner.flush()?;
        }
        Ok(buf.len())
    }

    /// In line mode the UART's per-byte flushes are ignored: lines are written as they
    /// complete.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.whole_lines {
            return Ok(());
        }
        self.inner.flush()
    }
}

impl Drop for LineOut {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, LineOut>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        match bytes.get(..n).map(|b| self.uart.enqueue_raw_bytes(b)) {
            Some(Ok(done)) => done,
            Some(Err(e)) => {
                log::warn!("bulkhead-vmm: serial input dropped: {e:?}");
                n
            }
            None => 0,
        }
    }

    /// Writes and flushes what is held back of an unterminated line.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().finish();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *v) {
                log::warn!("bulkhead-vmm: serial write failed: {e:?}");
            }
        }
    }
}

/// Feeds `input` to the guest's COM1 from a thread, until EOF. When the FIFO is full it waits
/// for the guest to drain it.
pub fn spawn_input_thread(
    serial: Arc<Mutex<SerialDevice>>,
    mut input: Box<dyn Read + Send>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Worker);
            let mut buf = [0u8; 64];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut pending = buf.get(..n).unwrap_or(&[]);
                while !pending.is_empty() {
                    let done = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(pending);
                    pending = pending.get(done..).unwrap_or(&[]);
                    if !pending.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_raises_the_irq() {
        let out = Shared::default();
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            LineOut::lines(Box::new(out.clone())),
        );
        for b in b"hi\nthere" {
            dev.write(0x3f8, 0, &[*b]);
        }
        // Whole lines go out as they complete; the unterminated rest when flushed.
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        dev.flush();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\nthere");
        // Enable the received-data interrupt (IER bit 0), then feed a byte.
        dev.write(0x3f8, 1, &[1]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(0x3f8, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rx = [0u8];
        dev.read(0x3f8, 0, &mut rx);
        assert_eq!(rx[0], b'x');
    }

    /// Each write reaches the destination as whole lines, however the UART feeds bytes,
    /// so another writer to the same pipe cannot land in the middle of a line.
    #[test]
    fn lines_are_written_whole_and_long_ones_in_pieces() {
        #[derive(Clone, Default)]
        struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);
        impl Write for Writes {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().push(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w = Writes::default();
        let mut out = LineOut::lines(Box::new(w.clone()));
        for b in b"one\ntwo\nthr" {
            out.write_all(&[*b]).unwrap();
            out.flush().unwrap();
        }
        assert_eq!(
            *w.0.lock().unwrap(),
            vec![b"one\n".to_vec(), b"two\n".to_vec()]
        );
        out.write_all(&vec![b'x'; MAX_PENDING]).unwrap();
        assert_eq!(w.0.lock().unwrap().len(), 3);
        assert_eq!(w.0.lock().unwrap()[2].len(), MAX_PENDING + 3);
        out.write_all(b"tail").unwrap();
        drop(out);
        assert_eq!(w.0.lock().unwrap()[3], b"tail".to_vec());
    }
}
