//! Tiny hand-assembled real-mode guests on this machine's /dev/kvm: port I/O exits reach the
//! devices, COM1 output appears, the ACPI PM register ends the VM with the right reason, and
//! PCI configuration reads through 0xcf8/0xcfc see the host bridge and the virtio devices.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use bulkhead_vmm::devices::legacy::serial::SerialOut;
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::vm::Vm;
use bulkhead_vmm::vstate::exit::ExitReason;
use vm_memory::{Bytes, GuestAddress};

const ENTRY: u16 = 0x1000;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `mov dx, port` ; `mov al, v` ; `out dx, al`
fn out8(code: &mut Vec<u8>, port: u16, v: u8) {
    code.push(0xba);
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xb0, v, 0xee]);
}

fn run_guest(code: &[u8], with_rng: bool) -> (ExitReason, Vec<u8>) {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let out = Captured::default();
    let mut vm = Vm::new(
        &kvm,
        32 << 20,
        1,
        SerialOut::lines(Box::new(out.clone())).unwrap(),
    )
    .unwrap();
    if with_rng {
        vm.add_virtio_device(Box::new(Rng::new())).unwrap();
    }
    vm.memory()
        .write_slice(code, GuestAddress(u64::from(ENTRY)))
        .unwrap();
    vm.vcpu(0).unwrap().configure_real_mode(ENTRY).unwrap();
    let running = vm.start(None).unwrap();
    let reason = running.wait();
    let reason = running.stop(reason);
    let bytes = out.0.lock().unwrap().clone();
    (reason, bytes)
}

#[test]
fn serial_output_then_acpi_poweroff() {
    let mut code = Vec::new();
    for b in b"Hello\n" {
        out8(&mut code, 0x3f8, *b);
    }
    out8(&mut code, 0x600, (5 << 2) | (1 << 5)); // SLP_TYP=5 | SLP_EN
    code.push(0xf4); // hlt (not reached)
    let (reason, out) = run_guest(&code, false);
    assert_eq!(reason, ExitReason::Poweroff);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(out, b"Hello\n");
}

/// A guest that prints far more than its serial destination takes (a pipe nobody reads,
/// which fills at 64 KiB) still runs to its power-off: the vCPU never waits for the output,
/// and what did not fit in the VMM's queue is counted as dropped.
#[test]
fn serial_output_to_a_pipe_nobody_reads_never_blocks_the_guest() {
    const BYTES: u32 = 1 << 19;
    let mut fds = [0; 2];
    // SAFETY: room for two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: two new fds owned by nothing else.
    let (reader, writer) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut code = Vec::new();
    code.extend_from_slice(&[0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'x']); // mov al, 'x'
    code.extend_from_slice(&[0x66, 0xb9]); // mov ecx, BYTES
    code.extend_from_slice(&BYTES.to_le_bytes());
    code.push(0xee); // loop: out dx, al
    code.extend_from_slice(&[0x66, 0x49]); // dec ecx
    code.extend_from_slice(&[0x75, 0xfb]); // jnz loop
    out8(&mut code, 0x600, (5 << 2) | (1 << 5));
    code.push(0xf4);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let out = SerialOut::lines(Box::new(std::fs::File::from(writer))).unwrap();
        let vm = Vm::new(&kvm, 32 << 20, 1, out).unwrap();
        vm.memory()
            .write_slice(&code, GuestAddress(u64::from(ENTRY)))
            .unwrap();
        vm.vcpu(0).unwrap().configure_real_mode(ENTRY).unwrap();
        let running = vm.start(None).unwrap();
        let reason = running.wait();
        let dropped = running.serial_output_dropped();
        let _ = tx.send((running.stop(reason), dropped));
    });
    // A hang guard, not a timing assertion: a vCPU blocked on the pipe never gets here.
    let (reason, dropped) = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the guest never powered off: its vCPU is stuck writing serial output");
    assert_eq!(reason, ExitReason::Poweroff);
    assert!(
        dropped > 0 && dropped < u64::from(BYTES),
        "{dropped} dropped"
    );
    drop(reader);
}

#[test]
fn acpi_reset_register_is_a_reboot() {
    let mut code = Vec::new();
    out8(&mut code, 0x600, 0x01);
    code.push(0xf4);
    let (reason, out) = run_guest(&code, false);
    assert_eq!(reason, ExitReason::Reboot);
    assert_eq!(reason.exit_code(), 3);
    assert!(out.is_empty());
}

#[test]
fn i8042_reset_is_a_reboot() {
    let mut code = Vec::new();
    out8(&mut code, 0x64, 0xfe);
    code.push(0xf4);
    assert_eq!(run_guest(&code, false).0, ExitReason::Reboot);
}

/// Reads config dword `reg` of `slot` and prints its 4 bytes on COM1.
fn print_config_dword(code: &mut Vec<u8>, slot: u32, reg: u32) {
    let addr: u32 = 0x8000_0000 | (slot << 11) | (reg << 2);
    code.extend_from_slice(&[0xba, 0xf8, 0x0c]); // mov dx, 0xcf8
    code.extend_from_slice(&[0x66, 0xb8]); // mov eax, addr
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xef]); // out dx, eax
    code.extend_from_slice(&[0xba, 0xfc, 0x0c]); // mov dx, 0xcfc
    code.extend_from_slice(&[0x66, 0xed]); // in eax, dx
    code.extend_from_slice(&[0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for _ in 0..4 {
        code.push(0xee); // out dx, al
        code.extend_from_slice(&[0x66, 0xc1, 0xe8, 0x08]); // shr eax, 8
    }
}

#[test]
fn pci_config_space_is_readable_from_the_guest() {
    let mut code = Vec::new();
    print_config_dword(&mut code, 0, 0); // host bridge IDs
    print_config_dword(&mut code, 1, 0); // virtio-rng IDs
    print_config_dword(&mut code, 2, 0); // empty slot
    out8(&mut code, 0x600, (5 << 2) | (1 << 5));
    code.push(0xf4);
    let (reason, out) = run_guest(&code, true);
    assert_eq!(reason, ExitReason::Poweroff);
    let dwords: Vec<u32> = out
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(dwords, vec![0x0008_1b36, 0x1044_1af4, 0xffff_ffff]);
}

#[test]
fn unclaimed_ports_read_all_ones() {
    let mut code = Vec::new();
    code.extend_from_slice(&[0xba, 0x34, 0x12]); // mov dx, 0x1234
    code.push(0xec); // in al, dx
    code.extend_from_slice(&[0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.push(0xee); // out dx, al
    out8(&mut code, 0x600, (5 << 2) | (1 << 5));
    code.push(0xf4);
    let (_, out) = run_guest(&code, false);
    assert_eq!(out, vec![0xff]);
}

#[test]
fn jumping_to_the_reset_vector_is_a_reboot() {
    // What Linux's machine_real_restart does: far jump to F000:FFF0 in real mode.
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Vm::new(
        &kvm,
        32 << 20,
        1,
        SerialOut::lines(Box::new(std::io::sink())).unwrap(),
    )
    .unwrap();
    bulkhead_vmm::boot::reset_vector::write_reset_stub(vm.memory()).unwrap();
    vm.memory()
        .write_slice(
            &[0xea, 0xf0, 0xff, 0x00, 0xf0],
            GuestAddress(u64::from(ENTRY)),
        )
        .unwrap();
    vm.vcpu(0).unwrap().configure_real_mode(ENTRY).unwrap();
    let running = vm.start(None).unwrap();
    let reason = running.wait();
    assert_eq!(running.stop(reason), ExitReason::Reboot);
}
