//! Fuzz the virtio-pci common configuration (and the rest of BAR 0: ISR, device config,
//! notifications, MSI-X table and PBA) as a guest driver, or a hostile guest, writes it:
//! any offset, size and value, the command register's memory bit, the MSI-X control word,
//! queues placed anywhere in real guest memory, DRIVER_OK (which starts the device's
//! worker: a virtio-blk over a memfd disk, or a virtio-rng) and resets.
//!
//! Checks: no panic; never a hang (a reset never waits for the worker); the number of
//! queues and the device features read back unchanged; a vector field reads back a vector
//! the device has or NO_VECTOR; with memory decoding off, BAR 0 reads all ones; the
//! device status never has FEATURES_OK with features the device did not offer.
#![no_main]

use std::os::fd::{FromRawFd, OwnedFd};

use arbitrary::Arbitrary;
use bulkhead_vmm::devices::pci::device::PciDevice;
use bulkhead_vmm::devices::virtio::blk::device::Block;
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::devices::virtio::transport_pci::VirtioPciDevice;
use bulkhead_vmm::devices::virtio::VirtioDevice;
use bulkhead_vmm_fuzz::{memory, Addr, Desc, RawQueue};
use libfuzzer_sys::fuzz_target;

const BAR: u64 = 0xc000_0000;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    One,
    Two,
    Four,
    Eight,
}

impl Size {
    fn len(self) -> usize {
        match self {
            Size::One => 1,
            Size::Two => 2,
            Size::Four => 4,
            Size::Eight => 8,
        }
    }
}

/// Offsets a driver uses, and any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Offset {
    Common(u8),
    Isr,
    Device(u8),
    Notify(u8),
    Msix(u16),
    Pba(u8),
    Any(u16),
}

impl Offset {
    fn get(self) -> u64 {
        match self {
            Offset::Common(o) => u64::from(o % 0x40),
            Offset::Isr => 0x1000,
            Offset::Device(o) => 0x2000 + u64::from(o),
            Offset::Notify(q) => 0x3000 + 4 * u64::from(q % 4),
            Offset::Msix(o) => 0x4000 + u64::from(o % 0x1000),
            Offset::Pba(o) => 0x5000 + u64::from(o),
            Offset::Any(o) => u64::from(o),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Write {
        at: Offset,
        size: Size,
        value: u64,
    },
    Read {
        at: Offset,
        size: Size,
    },
    /// The driver's setup of queue `q` with its rings at these addresses.
    SetupQueue {
        q: u8,
        size: u16,
        desc: Addr,
        avail: Addr,
        used: Addr,
    },
    /// The standard rings of queue 0 with chains in them, then a notify.
    Chains(Vec<Vec<Desc>>),
    /// Status write.
    Status(u8),
    /// Features the driver acks.
    Features(u64),
    /// The command register (memory decode, bus master).
    Command(u16),
    /// The MSI-X capability's control word (enable, function mask).
    MsixControl(u16),
    /// The guest's wait for a reset to finish (bounded).
    WaitReset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    blk: bool,
    ops: Vec<Op>,
}

fn read(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn write(d: &mut VirtioPciDevice, off: u64, len: usize, v: u64) {
    d.bar_write(0, off, &v.to_le_bytes()[..len]);
}

fn msix_cap(d: &mut VirtioPciDevice) -> Option<usize> {
    let mut off = (d.config_read(0xd) & 0xfc) as usize;
    for _ in 0..16 {
        if off == 0 {
            return None;
        }
        let w = d.config_read(off / 4);
        if w & 0xff == 0x11 {
            return Some(off);
        }
        off = ((w >> 8) & 0xfc) as usize;
    }
    None
}

fuzz_target!(|input: Input| {
    let mem = memory();
    let dev: Box<dyn VirtioDevice> = if input.blk {
        // SAFETY: a static name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return;
        }
        // SAFETY: a new fd nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        if file.set_len(8 << 10).is_err() {
            return;
        }
        match Block::new(file, false, "fuzz") {
            Ok(b) => Box::new(b),
            Err(_) => return,
        }
    } else {
        Box::new(Rng::new())
    };
    let offered = dev.features();
    let Ok(mut d) = VirtioPciDevice::new_unrouted(dev, mem.clone(), BAR, 0) else {
        return;
    };
    let vectors = d.msix().count() as u64;
    let Some(cap) = msix_cap(&mut d) else { return };
    d.config_write(1, 0, &[0x06]); // memory decode and bus master, as Linux sets them
    let queues = read(&mut d, 0x12, 2);
    let mut rq = RawQueue::new(&mem, 0);
    // A reset was written and the guest has not seen status 0 since.
    let mut resetting = false;

    for op in input.ops.into_iter().take(96) {
        match op {
            Op::Write { at, size, value } => {
                let off = at.get();
                write(&mut d, off, size.len(), value);
                if off == 0x14 {
                    resetting = value as u8 == 0;
                }
            }
            Op::Read { at, size } => {
                read(&mut d, at.get(), size.len());
            }
            Op::SetupQueue {
                q,
                size,
                desc,
                avail,
                used,
            } => {
                write(&mut d, 0x16, 2, u64::from(q % 3));
                write(&mut d, 0x18, 2, u64::from(size));
                for (off, a) in [(0x20, desc), (0x28, avail), (0x30, used)] {
                    let a = a.get();
                    write(&mut d, off, 4, a & 0xffff_ffff);
                    write(&mut d, off + 4, 4, a >> 32);
                }
                write(&mut d, 0x1c, 2, 1);
            }
            Op::Chains(chains) => {
                rq.recycle();
                let (desc, avail, used) = rq.addresses();
                write(&mut d, 0x16, 2, 0);
                write(&mut d, 0x18, 2, u64::from(bulkhead_vmm_fuzz::QUEUE_SIZE));
                write(&mut d, 0x20, 4, desc);
                write(&mut d, 0x28, 4, avail);
                write(&mut d, 0x30, 4, used);
                write(&mut d, 0x1c, 2, 1);
                for c in chains.iter().take(8) {
                    let c: Vec<Desc> = c.iter().copied().take(8).collect();
                    rq.push(&mem, &c);
                }
                write(&mut d, 0x3000, 2, 0);
            }
            Op::Status(s) => {
                write(&mut d, 0x14, 1, u64::from(s));
                resetting = s == 0;
            }
            Op::Features(f) => {
                write(&mut d, 0x08, 4, 0);
                write(&mut d, 0x0c, 4, f & 0xffff_ffff);
                write(&mut d, 0x08, 4, 1);
                write(&mut d, 0x0c, 4, f >> 32);
            }
            Op::Command(c) => {
                d.config_write(1, 0, &c.to_le_bytes());
            }
            Op::MsixControl(c) => {
                d.config_write((cap + 2) / 4, (cap + 2) % 4, &c.to_le_bytes());
            }
            Op::WaitReset => {
                // What a driver does after a reset: poll until status 0 (bounded).
                if resetting {
                    for _ in 0..2000 {
                        if d.status() == 0 {
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    resetting = false;
                }
            }
        }
        let decoding = d.config_read(1) & 0x2 != 0;
        if !decoding {
            if read(&mut d, 0x12, 2) != 0xffff {
                panic!("BAR 0 decodes with the memory bit clear");
            }
            continue;
        }
        if read(&mut d, 0x12, 2) != queues {
            panic!("the number of queues changed");
        }
        for sel in [0u64, 1] {
            write(&mut d, 0x00, 4, sel);
            let want = (offered >> (32 * sel)) & 0xffff_ffff;
            if read(&mut d, 0x04, 4) != want {
                panic!("device features word {sel} changed");
            }
        }
        let v = read(&mut d, 0x10, 2);
        if v >= vectors && v != 0xffff {
            panic!("msix_config reads back vector {v} of {vectors}");
        }
        let v = read(&mut d, 0x1a, 2);
        if v >= vectors && v != 0xffff {
            panic!("queue_msix_vector reads back vector {v} of {vectors}");
        }
        let status = read(&mut d, 0x14, 1) as u8;
        if status & 0x8 != 0 {
            let mut acked = 0u64;
            for sel in [0u64, 1] {
                write(&mut d, 0x08, 4, sel);
                acked |= read(&mut d, 0x0c, 4) << (32 * sel);
            }
            if acked & !offered != 0 || acked & (1 << 32) == 0 {
                panic!("FEATURES_OK with features {acked:#x} (offered {offered:#x})");
            }
        }
    }
});
