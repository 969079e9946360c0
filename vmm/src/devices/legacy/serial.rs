//! COM1: a 16550A UART (vm-superio) on ports 0x3f8..0x3ff whose interrupt reaches IOAPIC pin 4
//! through an irqfd. Output goes through a bounded queue to any writer (stdout, a file, a
//! pipe; `serial_out`), so a destination that takes nothing never holds up a vCPU; input
//! comes from a reader thread that feeds the receive FIFO.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub use super::serial_out::{LineOut, SerialOut};
use crate::devices::bus::BusDevice;

/// How long the VM's end waits for queued output to reach its destination.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// The serial interrupt line: an eventfd bound to the UART's GSI with an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The COM1 device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
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

    /// At the VM's end (never on a vCPU): waits a bounded time for queued output to reach
    /// its destination, with what is held back of an unterminated line, and logs how much
    /// guest output was dropped in all, if any.
    pub fn flush(&mut self) {
        let out = self.uart.writer_mut();
        if !out.flush_within(FINAL_FLUSH) {
            log::warn!("bulkhead-vmm: serial: output still queued at the end was not written");
        }
        let dropped = out.dropped();
        if dropped > 0 {
            log::warn!("bulkhead-vmm: serial: {dropped} bytes of guest output were dropped in all");
        }
    }

    /// Bytes of guest output dropped so far because the destination did not take them.
    pub fn output_dropped(&mut self) -> u64 {
        self.uart.writer_mut().dropped()
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
    use std::io::Write;

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
            SerialOut::lines(Box::new(out.clone())).unwrap(),
        );
        for b in b"hi\nthere" {
            dev.write(0x3f8, 0, &[*b]);
        }
        // Whole lines go out as they complete (from the writer thread: a hang guard, not a
        // timing assertion); the unterminated rest when flushed.
        for _ in 0..20_000 {
            if out.0.lock().unwrap().as_slice() == b"hi\n" {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        dev.flush();
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\nthere");
        assert_eq!(dev.output_dropped(), 0);
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
}
