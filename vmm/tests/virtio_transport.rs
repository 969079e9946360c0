//! The virtio-pci transport driven the way a guest driver does: capability discovery, feature
//! negotiation, queue setup, DRIVER_OK, a notification, an MSI-X interrupt, and reset.
//! The device behind it is the real virtio-rng; the queue is virtio-queue's mock driver side.

mod common;

use bulkhead_vmm::devices::pci::device::PciDevice;
use bulkhead_vmm::devices::virtio::rng::device::Rng;
use bulkhead_vmm::devices::virtio::transport_pci::{VirtioPciDevice, NOTIFY_OFFSET};
use bulkhead_vmm::devices::virtio::{
    status, ActivateError, Activation, ShmRegion, ShmRegionSpec, VirtioDevice,
};
use std::sync::{Arc, Mutex};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const BAR: u64 = 0xc000_0000;
const SHM: u64 = 0x10_0000_0000;

fn r32(d: &mut VirtioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}
fn r16(d: &mut VirtioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.bar_read(0, off, &mut b);
    u16::from_le_bytes(b)
}
fn r8(d: &mut VirtioPciDevice, off: u64) -> u8 {
    let mut b = [0u8; 1];
    d.bar_read(0, off, &mut b);
    b[0]
}
fn w32(d: &mut VirtioPciDevice, off: u64, v: u32) {
    d.bar_write(0, off, &v.to_le_bytes());
}
fn w16(d: &mut VirtioPciDevice, off: u64, v: u16) {
    d.bar_write(0, off, &v.to_le_bytes());
}
fn w8(d: &mut VirtioPciDevice, off: u64, v: u8) {
    d.bar_write(0, off, &[v]);
}

/// A transport at BAR with memory decoding enabled (what the guest's PCI core does before
/// a driver touches BAR 0).
fn device(
    dev: Box<dyn VirtioDevice>,
    mem: bulkhead_vmm::vstate::memory::GuestMemoryMmap,
) -> VirtioPciDevice {
    let mut d = VirtioPciDevice::new_unrouted(dev, mem, BAR, SHM).unwrap();
    d.config_write(1, 0, &[0x02]);
    d
}

/// Walks the capability list: (id, offset) pairs, plus virtio cfg_type for vendor caps.
fn capabilities(d: &mut VirtioPciDevice) -> Vec<(u8, usize, u8)> {
    let byte =
        |d: &mut VirtioPciDevice, off: usize| (d.config_read(off / 4) >> ((off % 4) * 8)) as u8;
    let mut caps = Vec::new();
    let mut off = byte(d, 0x34) as usize;
    while off != 0 && caps.len() < 16 {
        let id = byte(d, off);
        let cfg_type = byte(d, off + 3);
        caps.push((id, off, cfg_type));
        off = byte(d, off + 1) as usize;
    }
    caps
}

fn enable_msix(d: &mut VirtioPciDevice) {
    let (_, msix, _) = capabilities(d)
        .into_iter()
        .find(|c| c.0 == 0x11)
        .expect("MSI-X capability");
    d.config_write((msix + 2) / 4, (msix + 2) % 4 + 1, &[0x80]); // enable
    for v in 0..2u64 {
        w32(d, 0x4000 + v * 16, 0xfee0_0000);
        w32(d, 0x4000 + v * 16 + 8, 0x30 + v as u32);
        w32(d, 0x4000 + v * 16 + 12, 0); // unmask
    }
}

/// What a driver does after writing status 0: reads the status until it is 0 (a hang guard
/// of 20 s, not a timing assertion).
fn wait_for_reset(d: &mut VirtioPciDevice) {
    for _ in 0..20_000 {
        if r8(d, 0x14) == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("the device's reset never finished");
}

fn negotiate(d: &mut VirtioPciDevice, driver_features_hi: u32) -> u8 {
    w8(d, 0x14, status::ACKNOWLEDGE);
    w8(d, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    w32(d, 0x08, 1);
    w32(d, 0x0c, driver_features_hi);
    w8(
        d,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    r8(d, 0x14)
}

#[test]
fn pci_identity_and_capabilities() {
    let mem = common::memory();
    let mut d = device(Box::new(Rng::new()), mem);
    assert_eq!(d.config_read(0), 0x1044_1af4);
    assert_eq!(d.config_read(4), BAR as u32);
    let caps = capabilities(&mut d);
    let vendor_types: Vec<u8> = caps.iter().filter(|c| c.0 == 0x09).map(|c| c.2).collect();
    assert_eq!(
        vendor_types,
        vec![1, 3, 4, 2],
        "common, isr, device, notify"
    );
    assert!(caps.iter().any(|c| c.0 == 0x11));
    // Device features: VERSION_1 in the high word, nothing in the low word.
    w32(&mut d, 0x00, 0);
    assert_eq!(r32(&mut d, 0x04), 0);
    w32(&mut d, 0x00, 1);
    assert_eq!(r32(&mut d, 0x04), 1);
    let mut nq = [0u8; 2];
    d.bar_read(0, 0x12, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
}

/// A vector number the device does not have reads back as NO_VECTOR (virtio 1.x
/// §4.1.4.3.2: the driver checks the read-back to learn that the mapping failed), for the
/// configuration vector and the queues' alike. The rng has two vectors (0, 1).
#[test]
fn an_out_of_range_msix_vector_reads_back_no_vector() {
    let mut d = device(Box::new(Rng::new()), common::memory());
    for (off, v, back) in [
        (0x10, 1, 1),
        (0x10, 2, 0xffff),
        (0x10, 0x7fff, 0xffff),
        (0x1a, 0, 0),
        (0x1a, 5, 0xffff),
        (0x1a, 0xfffe, 0xffff),
        (0x1a, 0xffff, 0xffff),
    ] {
        w16(&mut d, off, v);
        assert_eq!(r16(&mut d, off), back, "vector {v:#x} at {off:#x}");
    }
}

/// With the command register's memory-decode bit clear (as at power-on, and while a
/// driver sizes BARs), BAR 0 does not decode: reads give all ones and writes are dropped.
#[test]
fn bar0_decodes_only_with_the_memory_bit_set() {
    let mut d =
        VirtioPciDevice::new_unrouted(Box::new(Rng::new()), common::memory(), BAR, SHM).unwrap();
    assert_eq!(d.config_read(1) & 0x2, 0, "decode is off at power-on");
    assert_eq!(r16(&mut d, 0x12), 0xffff, "num_queues");
    assert_eq!(r32(&mut d, 0x04), 0xffff_ffff, "device features");
    w8(&mut d, 0x14, status::ACKNOWLEDGE);
    d.config_write(1, 0, &[0x02]);
    assert_eq!(r16(&mut d, 0x12), 1, "one queue");
    assert_eq!(
        r8(&mut d, 0x14),
        0,
        "the write while decode was off was dropped"
    );
    w8(&mut d, 0x14, status::ACKNOWLEDGE);
    assert_eq!(r8(&mut d, 0x14), status::ACKNOWLEDGE);
    d.config_write(1, 0, &[0x00]);
    assert_eq!(r8(&mut d, 0x14), 0xff);
}

#[test]
fn features_not_offered_are_refused() {
    let mut d = device(Box::new(Rng::new()), common::memory());
    // Bit 33 (VIRTIO_F_ACCESS_PLATFORM) is not offered.
    let st = negotiate(&mut d, 0b11);
    assert_eq!(st & status::FEATURES_OK, 0);
    // A driver without VERSION_1 is refused too.
    w8(&mut d, 0x14, 0);
    let st = negotiate(&mut d, 0);
    assert_eq!(st & status::FEATURES_OK, 0);
    w8(&mut d, 0x14, 0);
    assert_eq!(r8(&mut d, 0x14), 0);
    let st = negotiate(&mut d, 1);
    assert_ne!(st & status::FEATURES_OK, 0);
}

/// Once FEATURES_OK is set the features are settled: a driver that writes the feature
/// words afterwards (with bits the device never offered) changes nothing, so what the
/// device is activated with is what it accepted.
#[test]
fn driver_features_are_frozen_once_features_ok_is_set() {
    let mut d = device(Box::new(Rng::new()), common::memory());
    assert_ne!(negotiate(&mut d, 1) & status::FEATURES_OK, 0);
    w32(&mut d, 0x08, 1);
    w32(&mut d, 0x0c, 0b11); // VERSION_1 and ACCESS_PLATFORM (not offered)
    w32(&mut d, 0x08, 0);
    w32(&mut d, 0x0c, 0xffff_ffff);
    w32(&mut d, 0x08, 1);
    assert_eq!(r32(&mut d, 0x0c), 1, "high word as accepted");
    w32(&mut d, 0x08, 0);
    assert_eq!(r32(&mut d, 0x0c), 0, "low word as accepted");
    assert_ne!(r8(&mut d, 0x14) & status::FEATURES_OK, 0);
}

#[test]
fn rng_request_round_trip_with_msix_interrupt_and_reset() {
    let mem = common::memory();
    let mut d = device(Box::new(Rng::new()), mem.clone());
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    enable_msix(&mut d);
    assert_ne!(negotiate(&mut d, 1) & status::FEATURES_OK, 0);
    w16(&mut d, 0x10, 0); // config vector 0
    w16(&mut d, 0x16, 0); // queue 0
    w16(&mut d, 0x18, 16);
    w16(&mut d, 0x1a, 1); // queue vector 1
    let a = mock.desc_table_addr().0;
    w32(&mut d, 0x20, a as u32);
    w32(&mut d, 0x24, (a >> 32) as u32);
    let a = mock.avail_addr().0;
    w32(&mut d, 0x28, a as u32);
    let a = mock.used_addr().0;
    w32(&mut d, 0x30, a as u32);
    w16(&mut d, 0x1c, 1);
    assert_eq!(r32(&mut d, 0x20) as u64, mock.desc_table_addr().0);
    w8(&mut d, 0x14, 0xf); // DRIVER_OK
    assert_eq!(d.status(), 0xf);

    // One 64-byte device-writable buffer.
    let buf = 0x20_0000u64;
    mock.add_desc_chains(&common::chain(0, &[(buf, 64, true)]), 0)
        .unwrap();
    w16(&mut d, NOTIFY_OFFSET, 0); // trapped notify (no ioeventfd in this test)
    assert!(
        common::wait_readable(d.msix().eventfd(1).unwrap()),
        "queue interrupt"
    );
    assert_eq!(mock.used().idx().load(), 1);
    let elem = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(elem.len(), 64);
    let mut got = [0u8; 64];
    mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
    assert!(got.iter().any(|b| *b != 0), "random bytes written");
    // ISR says "queue interrupt" once, then clears.
    assert_eq!(r8(&mut d, 0x1000), 1);
    assert_eq!(r8(&mut d, 0x1000), 0);

    // Reset: status 0 (once the worker has stopped: a driver polls for it), queue
    // disabled, vectors cleared.
    w8(&mut d, 0x14, 0);
    wait_for_reset(&mut d);
    assert_eq!(r32(&mut d, 0x1c) & 0xffff, 0);
    let mut v = [0u8; 2];
    d.bar_read(0, 0x1a, &mut v);
    assert_eq!(u16::from_le_bytes(v), 0xffff);
}

#[test]
fn rng_skips_read_only_buffers() {
    let mem = common::memory();
    let mut d = device(Box::new(Rng::new()), mem.clone());
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
    enable_msix(&mut d);
    negotiate(&mut d, 1);
    w16(&mut d, 0x18, 16);
    w16(&mut d, 0x1a, 1);
    w32(&mut d, 0x20, mock.desc_table_addr().0 as u32);
    w32(&mut d, 0x28, mock.avail_addr().0 as u32);
    w32(&mut d, 0x30, mock.used_addr().0 as u32);
    w16(&mut d, 0x1c, 1);
    w8(&mut d, 0x14, 0xf);
    // A read-only buffer, then a buffer outside guest memory: both return 0 bytes, no panic.
    mock.add_desc_chains(&common::chain(0, &[(0x20_0000, 32, false)]), 0)
        .unwrap();
    mock.add_desc_chains(&common::chain(1, &[(0x7fff_0000_0000, 32, true)]), 1)
        .unwrap();
    w16(&mut d, NOTIFY_OFFSET, 0);
    assert!(common::wait_readable(d.msix().eventfd(1).unwrap()));
    // The worker may have signalled after the first chain only; wait for both.
    while mock.used().idx().load() < 2 {
        assert!(common::wait_readable(d.msix().eventfd(1).unwrap()));
    }
    for i in 0..2 {
        assert_eq!(mock.used().ring().ref_at(i).unwrap().load().len(), 0);
    }
}

/// A test device that only asks for shared-memory regions and records where they land.
struct ShmRecorder {
    seen: Arc<Mutex<Vec<Vec<ShmRegion>>>>,
}

impl VirtioDevice for ShmRecorder {
    fn device_type(&self) -> u32 {
        63
    }
    fn name(&self) -> &str {
        "shm-recorder"
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _a: Activation) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
    fn shm_regions(&self) -> Vec<ShmRegionSpec> {
        vec![
            ShmRegionSpec {
                id: 0,
                size: 1 << 30,
            },
            ShmRegionSpec {
                id: 1,
                size: 0x1800,
            },
        ]
    }
    fn set_shm_regions(&mut self, regions: &[ShmRegion]) {
        self.seen.lock().unwrap().push(regions.to_vec());
    }
}

#[test]
fn shared_memory_regions_get_a_64_bit_bar_and_capabilities_with_a_test_device() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let dev = ShmRecorder { seen: seen.clone() };
    let mut d = VirtioPciDevice::new_unrouted(Box::new(dev), common::memory(), BAR, SHM).unwrap();
    // BAR 2: 64-bit prefetchable at SHM, size rounded up to 2 GiB.
    assert_eq!(d.config_read(6), (SHM as u32) | 0xc);
    assert_eq!(d.config_read(7), (SHM >> 32) as u32);
    d.config_write(6, 0, &[0xff; 4]);
    d.config_write(7, 0, &[0xff; 4]);
    assert_eq!(d.config_read(6) & !0xf, 0x8000_0000, "2 GiB BAR");
    assert_eq!(d.config_read(7), 0xffff_ffff);
    d.config_write(6, 0, &((SHM as u32) | 0xc).to_le_bytes());
    d.config_write(7, 0, &((SHM >> 32) as u32).to_le_bytes());
    // Two shared-memory capabilities (cfg_type 8) with region offsets within BAR 2.
    let caps = capabilities(&mut d);
    let shm: Vec<_> = caps.iter().filter(|c| c.0 == 0x09 && c.2 == 8).collect();
    assert_eq!(shm.len(), 2);
    let off = shm[1].1;
    let word = |d: &mut VirtioPciDevice, o: usize| d.config_read(o / 4);
    assert_eq!(word(&mut d, off) >> 16 & 0xff, 24, "cap_len");
    assert_eq!(word(&mut d, off + 4) & 0xff, 2, "bar");
    assert_eq!(word(&mut d, off + 4) >> 8 & 0xff, 1, "id");
    assert_eq!(word(&mut d, off + 8), 1 << 30, "offset of region 1");
    assert_eq!(word(&mut d, off + 12), 0x1800, "length of region 1");
    // The device learned the addresses; a BAR move tells it again.
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0][1].guest_addr, SHM + (1 << 30));
    }
    let (bar, mapping) = d.bars().into_iter().find(|b| b.0.index == 2).unwrap();
    assert_eq!(
        mapping,
        bulkhead_vmm::devices::pci::device::BarMapping::DeviceMapped
    );
    let mv = d.config_write(7, 0, &0x20u32.to_le_bytes()).unwrap();
    d.bar_moved(&mv).unwrap();
    assert_eq!(bar.size, 2 << 30);
    let s = seen.lock().unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(s[1][0].guest_addr, 0x20_0000_0000);
}
