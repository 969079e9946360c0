//! Host memory (a memfd) mapped into a running guest through a run-time KVM memory slot, on
//! this machine's /dev/kvm: a 64-bit guest reads it, writes it, and a read-only slot turns
//! the write into an ignored MMIO exit. Dropping the handle removes the slot.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use bulkhead_vmm::boot::long_mode::write_boot_structures;
use bulkhead_vmm::devices::legacy::serial::SerialOut;
use bulkhead_vmm::vm::Vm;
use bulkhead_vmm::vstate::exit::ExitReason;
use bulkhead_vmm::vstate::memory_slots::HostMapping;
use vm_memory::{Bytes, GuestAddress};

const SHM_GPA: u64 = 0x2000_0000;

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

fn memfd_with(byte: u8) -> std::fs::File {
    // SAFETY: memfd_create with a static NUL-terminated name returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"slot-test".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(4096).unwrap();
    f.write_all(&[byte]).unwrap();
    f
}

fn run(writable: bool) -> (Vec<u8>, u8) {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let out = Captured::default();
    let vm = Vm::new(
        &kvm,
        32 << 20,
        1,
        SerialOut::lines(Box::new(out.clone())).unwrap(),
    )
    .unwrap();
    write_boot_structures(vm.memory()).unwrap();
    let code: Vec<u8> = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xbb, 0x00, 0x00, 0x00, 0x20, // mov ebx, SHM_GPA
        0x8a, 0x03, 0xee, // mov al, [rbx]; out dx, al
        0xc6, 0x03, b'W', // mov byte [rbx], 'W'
        0x8a, 0x03, 0xee, // mov al, [rbx]; out dx, al
        0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, // S5
        0xf4,
    ];
    vm.memory()
        .write_slice(&code, GuestAddress(0x10_0000))
        .unwrap();
    vm.vcpu(0).unwrap().configure_long_mode(0x10_0000).unwrap();
    let mut memfd = memfd_with(b'M');
    let mapping = Arc::new(HostMapping::map_fd(&memfd, 4096, writable).unwrap());
    let slot = vm.memory_slots().map(SHM_GPA, mapping).unwrap();
    assert_eq!(slot.guest_addr(), SHM_GPA);
    let running = vm.start(None).unwrap();
    let reason = running.wait();
    assert_eq!(running.stop(reason), ExitReason::Poweroff);
    drop(slot);
    let mut b = [0u8];
    memfd.seek(SeekFrom::Start(0)).unwrap();
    memfd.read_exact(&mut b).unwrap();
    let serial = out.0.lock().unwrap().clone();
    (serial, b[0])
}

#[test]
fn writable_slot_is_shared_with_the_host() {
    assert_eq!(run(true), (b"MW".to_vec(), b'W'));
}

#[test]
fn read_only_slot_ignores_guest_writes() {
    assert_eq!(run(false), (b"MM".to_vec(), b'M'));
}

#[test]
fn slots_are_reused_after_drop_and_misaligned_requests_fail() {
    let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
    let vm = Vm::new(
        &kvm,
        32 << 20,
        1,
        SerialOut::lines(Box::new(std::io::sink())).unwrap(),
    )
    .unwrap();
    let memfd = memfd_with(0);
    let m = Arc::new(HostMapping::map_fd(&memfd, 4096, true).unwrap());
    let a = vm.memory_slots().map(SHM_GPA, m.clone()).unwrap();
    let n = a.slot();
    drop(a);
    let b = vm.memory_slots().map(SHM_GPA + 0x1000, m.clone()).unwrap();
    assert_eq!(b.slot(), n, "slot number reused");
    assert!(vm.memory_slots().map(SHM_GPA + 1, m.clone()).is_err());
    // Overlapping guest RAM is refused by KVM.
    assert!(vm.memory_slots().map(0x1000, m).is_err());
    assert!(HostMapping::map_fd(&memfd, 100, true).is_err());
}
