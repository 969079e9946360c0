//! Fuzz the MSI-X table of an emulated device: table and PBA accesses of any offset and
//! size (as the transport forwards them from BAR 0), writes of the capability's control
//! word, and vectors raised by the device, including vectors it does not have.
//!
//! Checks: no panic; a raised vector fires its eventfd exactly when MSI-X is enabled and
//! neither the function nor its entry is masked (read back from the table itself), and is
//! otherwise pending (PBA bit set, no interrupt) until it is unmasked, when it fires once.
#![no_main]

use arbitrary::Arbitrary;
use bulkhead_vmm::devices::pci::msix::{MsixVectors, MSIX_ENTRY_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    WriteTable { offset: u16, data: Vec<u8> },
    ReadTable { offset: u16, len: u8 },
    ReadPba { offset: u8, len: u8 },
    Control(u16),
    Trigger(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    vectors: u8,
    ops: Vec<Op>,
}

const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

struct Model {
    control: u16,
}

fn entry_masked(m: &MsixVectors, v: usize) -> bool {
    let mut c = [0u8; 4];
    m.read_table(v as u64 * MSIX_ENTRY_SIZE + 12, &mut c);
    u32::from_le_bytes(c) & 1 != 0
}

fn masked(m: &MsixVectors, model: &Model, v: usize) -> bool {
    model.control & ENABLE == 0 || model.control & FUNCTION_MASK != 0 || entry_masked(m, v)
}

fn pending(m: &MsixVectors, v: usize) -> bool {
    let mut b = [0u8; 1];
    m.read_pba((v / 8) as u64, &mut b);
    b[0] & (1 << (v % 8)) != 0
}

fn fired(m: &MsixVectors, v: usize) -> bool {
    m.eventfd(v).is_some_and(|e| e.read().is_ok())
}

fuzz_target!(|input: Input| {
    let count = u16::from(input.vectors % 16) + 1;
    let Ok(m) = MsixVectors::new_unrouted(count) else {
        return;
    };
    let n = usize::from(count);
    let mut model = Model { control: 0 };
    for op in input.ops.into_iter().take(256) {
        // What is masked and pending before the operation.
        let before: Vec<(bool, bool)> = (0..n)
            .map(|v| (masked(&m, &model, v), pending(&m, v)))
            .collect();
        for v in 0..n {
            fired(&m, v); // drain
        }
        match op {
            Op::WriteTable { offset, data } => {
                let len = data.len().min(8);
                m.write_table(u64::from(offset % 0x1100), &data[..len]);
            }
            Op::ReadTable { offset, len } => {
                let mut d = vec![0u8; usize::from(len % 9)];
                m.read_table(u64::from(offset % 0x1100), &mut d);
            }
            Op::ReadPba { offset, len } => {
                let mut d = vec![0u8; usize::from(len % 9)];
                m.read_pba(u64::from(offset), &mut d);
            }
            Op::Control(c) => {
                model.control = c;
                m.set_control(c);
            }
            Op::Trigger(v) => {
                let v16 = v % (count + 2);
                m.trigger(v16);
                let v = usize::from(v16);
                if v < n {
                    let is_masked = masked(&m, &model, v);
                    let f = fired(&m, v);
                    if is_masked && (f || !pending(&m, v)) {
                        panic!("masked vector {v}: fired {f}, pending {}", pending(&m, v));
                    }
                    if !is_masked && (!f || pending(&m, v)) {
                        panic!("unmasked vector {v}: fired {f}, pending {}", pending(&m, v));
                    }
                }
                continue;
            }
        }
        // A vector that was masked and pending fires once when it becomes unmasked.
        for (v, (was_masked, was_pending)) in before.into_iter().enumerate() {
            let now_masked = masked(&m, &model, v);
            let f = fired(&m, v);
            if was_masked && was_pending && !now_masked && (!f || pending(&m, v)) {
                panic!("vector {v} unmasked with a pending interrupt: fired {f}");
            }
            if (now_masked || !was_pending) && f {
                panic!("vector {v} fired without a trigger");
            }
        }
    }
});
