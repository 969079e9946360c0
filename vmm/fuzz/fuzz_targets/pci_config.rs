//! Fuzz PCI configuration-space writes as a guest makes them: through the 0xcf8/0xcfc port
//! pair (any offset and size, any address register), on bus 0 with the host bridge, a
//! virtio-rng (BAR 0) and a virtio_wl (BAR 0 and the 64-bit BAR 2), with BAR moves applied
//! to a real MMIO bus and BAR accesses through it.
//!
//! Checks: no panic; identity fields (vendor, device, class, header type, subsystem) and the
//! capability chain never change; a BAR always reads back aligned to its size with its type
//! bits; sizing a BAR (all ones, then the old value) leaves it where it was.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use bulkhead_vmm::devices::bus::{Bus, BusDevice};
use bulkhead_vmm::devices::pci::bus::{PciBus, PciConfigIo};
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::devices::virtio::transport_pci::VirtioPciDevice;
use bulkhead_vmm::devices::virtio::wl::device::Wl;
use bulkhead_vmm::devices::virtio::wl::sockets::WlSockets;
use bulkhead_vmm::devices::virtio::wl::state::WlLimits;
use bulkhead_vmm_fuzz::memory;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    One,
    Two,
    Four,
}

impl Size {
    fn len(self) -> usize {
        match self {
            Size::One => 1,
            Size::Two => 2,
            Size::Four => 4,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A port write at 0xcf8 + `port` (0..8).
    PortWrite { port: u8, size: Size, value: u32 },
    /// A port read.
    PortRead { port: u8, size: Size },
    /// A config write to (slot, function, reg, byte offset).
    Config {
        slot: u8,
        function: u8,
        reg: u8,
        offset: u8,
        size: Size,
        value: u32,
    },
    /// BAR sizing: all ones, then the value read back written again.
    Size { slot: u8, bar: u8 },
    /// An MMIO access through the bus.
    Mmio {
        addr: u32,
        high: bool,
        write: bool,
        size: Size,
        value: u32,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct Rig {
    io: PciConfigIo,
    mmio: Arc<Bus>,
}

impl Rig {
    fn select(&mut self, slot: u8, function: u8, reg: u8) {
        let addr = 0x8000_0000u32
            | (u32::from(slot % 32) << 11)
            | (u32::from(function % 8) << 8)
            | (u32::from(reg % 64) << 2);
        self.io.write(0xcf8, 0, &addr.to_le_bytes());
    }

    fn read(&mut self, slot: u8, reg: u8) -> u32 {
        self.select(slot, 0, reg);
        let mut d = [0u8; 4];
        self.io.read(0xcf8, 4, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(&mut self, slot: u8, reg: u8, value: u32) {
        self.select(slot, 0, reg);
        self.io.write(0xcf8, 4, &value.to_le_bytes());
    }

    /// The capability chain of `slot` as (offset, id) pairs (at most 16).
    fn caps(&mut self, slot: u8) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        let mut off = (self.read(slot, 0xd) & 0xfc) as u8;
        while off != 0 && out.len() < 16 {
            let w = self.read(slot, off / 4);
            out.push((off, w as u8));
            off = ((w >> 8) & 0xfc) as u8;
        }
        out
    }
}

const BAR0: [u64; 2] = [0xc000_0000, 0xc000_8000];
const SHM: u64 = 0x10_0000_0000;

fuzz_target!(|input: Input| {
    let mem = memory();
    let mmio = Arc::new(Bus::new());
    let mut bus = PciBus::new(mmio.clone());
    let Ok(rng) = VirtioPciDevice::new_unrouted(Box::new(Rng::new()), mem.clone(), BAR0[0], 0)
    else {
        return;
    };
    let Ok(wl) = Wl::new(WlSockets::new(), None, WlLimits::default()) else {
        return;
    };
    let Ok(wl) = VirtioPciDevice::new_unrouted(Box::new(wl), mem, BAR0[1], SHM) else {
        return;
    };
    if bus.add_device(Arc::new(Mutex::new(rng))).is_err()
        || bus.add_device(Arc::new(Mutex::new(wl))).is_err()
    {
        return;
    }
    let mut rig = Rig {
        io: PciConfigIo::new(Arc::new(Mutex::new(bus))),
        mmio,
    };
    // What must never change.
    let fixed: Vec<Vec<u32>> = (0..3u8)
        .map(|s| [0u8, 2, 3, 0xb].iter().map(|r| rig.read(s, *r)).collect())
        .collect();
    let caps: Vec<Vec<(u8, u8)>> = (0..3u8).map(|s| rig.caps(s)).collect();

    for op in input.ops.into_iter().take(128) {
        match op {
            Op::PortWrite { port, size, value } => {
                let b = value.to_le_bytes();
                rig.io.write(0xcf8, u64::from(port % 8), &b[..size.len()]);
            }
            Op::PortRead { port, size } => {
                let mut d = [0u8; 4];
                rig.io
                    .read(0xcf8, u64::from(port % 8), &mut d[..size.len()]);
            }
            Op::Config {
                slot,
                function,
                reg,
                offset,
                size,
                value,
            } => {
                rig.select(slot % 4, function, reg);
                let b = value.to_le_bytes();
                let off = u64::from(offset % 4);
                let len = size.len().min(4 - off as usize);
                rig.io.write(0xcf8, 4 + off, &b[..len]);
            }
            Op::Size { slot, bar } => {
                let (slot, reg) = (slot % 3, 4 + bar % 6);
                let old = rig.read(slot, reg);
                rig.write(slot, reg, u32::MAX);
                rig.read(slot, reg);
                rig.write(slot, reg, old);
                let back = rig.read(slot, reg);
                if back != old {
                    panic!("slot {slot} BAR reg {reg}: {old:#x} sized, restored, reads {back:#x}");
                }
            }
            Op::Mmio {
                addr,
                high,
                write,
                size,
                value,
            } => {
                let a = if high {
                    SHM + u64::from(addr)
                } else {
                    0xc000_0000 + u64::from(addr % 0x10_0000)
                };
                let mut d = value.to_le_bytes();
                if write {
                    rig.mmio.write(a, &d[..size.len()]);
                } else {
                    rig.mmio.read(a, &mut d[..size.len()]);
                }
            }
        }
    }
    for s in 0..3u8 {
        let now: Vec<u32> = [0u8, 2, 3, 0xb].iter().map(|r| rig.read(s, *r)).collect();
        let want = &fixed[usize::from(s)];
        // Header type and the identity fields; the latency timer and cache line size
        // (reg 3, low half) are not emulated as writable either.
        if now != *want {
            panic!("slot {s} identity changed: {want:x?} -> {now:x?}");
        }
        if rig.caps(s) != caps[usize::from(s)] {
            panic!("slot {s} capability chain changed");
        }
    }
    // BARs read back aligned to their size: BAR 0 of both (32 KiB), BAR 2 of wl (4 GiB).
    for s in 1..3u8 {
        let b0 = rig.read(s, 4);
        if b0 & 0x7ff0 != 0 || b0 & 0xf != 0 {
            panic!("slot {s} BAR 0 reads {b0:#x}");
        }
    }
    let lo = rig.read(2, 6);
    if lo != 0xc {
        panic!("wl BAR 2 low half reads {lo:#x}");
    }
});
