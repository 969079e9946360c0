//! One pass over each queue with virtio's notification suppression: the guest is asked for
//! a notification (a kick: a VM exit) only when the device is about to wait for it, and
//! interrupted only when its driver asked for it. With `VIRTIO_RING_F_EVENT_IDX` (offered,
//! and what Linux's virtio_net uses) that is `avail_event` and `used_event`; without it the
//! used ring's `NO_NOTIFY` flag (virtio-queue does not read the driver's `NO_INTERRUPT`
//! flag: then every pass that used buffers interrupts).
//!
//! - TX: notifications off while chains are taken; on again (and the queue looked at once
//!   more) when it is empty. A full ring leaves them off: the net VM's doorbell restarts
//!   the pass, and the guest's kicks would not help.
//! - RX: notifications off as long as frames find buffers (the guest refills its RX queue
//!   without a kick); on (and the queue looked at once more) only when a frame waits for a
//!   buffer, so the guest's next refill wakes the device.
//!
//! "Looked at once more" is one more round, not a loop on the guest's word: a driver that
//! publishes an available index the queue cannot have (more than its size ahead) makes
//! virtio-queue yield no chain while the index still says there are some; a second round
//! in a row that takes nothing ends the pass (its next kick starts another).

use bulkhead_netring::{Consumer, Producer, RingError, MAX_PAYLOAD};
use virtio_queue::{Queue, QueueT};
use vm_memory::VolatileSlice;

use super::rx::{Delivery, RxBuffers};
use super::stats::NetStats;
use crate::vstate::memory::GuestMemoryMmap;

/// What a pass over one queue did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains returned to the guest.
    pub used: u32,
    /// Frames moved (into the TX ring, or into the guest's RX buffers).
    pub frames: u32,
    /// TX: the ring was full (the net VM was asked for a doorbell when it frees space).
    /// RX: a frame waits for buffers (the guest was asked for a notification).
    pub blocked: bool,
    /// The driver wants an interrupt for the chains used.
    pub interrupt: bool,
}

fn interrupt_wanted(queue: &mut Queue, mem: &GuestMemoryMmap, used: u32) -> bool {
    // Called once per pass: with EVENT_IDX it compares `used_event` with everything this
    // pass used (virtio-queue counts the entries added since the last call).
    used > 0 && queue.needs_notification(mem).unwrap_or(true)
}

/// Moves the guest's TX chains into `ring` (`None`: the link is down, they are returned and
/// counted) until the queue is empty or the ring full.
pub fn serve_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut ring: Option<&mut Producer>,
    features: u64,
    stats: &NetStats,
) -> Result<Served, RingError> {
    let mut out = Served::default();
    let _ = queue.disable_notification(mem);
    let mut first_round = true;
    loop {
        let p = super::tx::process(queue, mem, ring.as_deref_mut(), features, stats)?;
        out.used += p.used;
        out.frames += p.frames;
        if p.used == 0 && !first_round {
            // Told there was more (below) and found nothing: a bad available index, or a
            // net VM that says it freed room it did not.
            out.blocked = p.ring_full;
            break;
        }
        first_round = false;
        let more = if p.ring_full {
            let room = match ring.as_deref_mut() {
                Some(r) => r.wait_for_space(MAX_PAYLOAD)?,
                None => false,
            };
            out.blocked = !room;
            room
        } else {
            // Empty: ask for a kick at the next chain, then look once more (one may have
            // come between the last look and the request).
            match queue.enable_notification(mem) {
                Ok(true) => {
                    let _ = queue.disable_notification(mem);
                    true
                }
                _ => false,
            }
        };
        if !more {
            break;
        }
    }
    out.interrupt = interrupt_wanted(queue, mem, out.used);
    Ok(out)
}

/// Delivers the RX ring's records into the guest's buffers until the ring is empty (the
/// net VM was asked for a doorbell: `Consumer::prepare_sleep`) or a frame waits for
/// buffers.
pub fn serve_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    ring: &mut Consumer,
    bufs: &mut RxBuffers,
    features: u64,
    stats: &NetStats,
) -> Result<Served, RingError> {
    let mut out = Served::default();
    let _ = queue.disable_notification(mem);
    // This delivery is a second look (the queue said buffers came).
    let mut second_look = false;
    loop {
        let Some(rec) = ring.peek()? else {
            if ring.prepare_sleep()? {
                break;
            }
            continue;
        };
        // SAFETY: the consumer checked that the record lies inside the ring's mapping,
        // which outlives `ring` (the contract of the `Mem` it was made from); only the
        // consumer reads it until it is popped.
        let src = unsafe { VolatileSlice::new(rec.ptr() as *mut u8, rec.len()) };
        let before = (out.used, bufs.stashed());
        match bufs.deliver(queue, mem, &src, features, stats, &mut out.used) {
            Delivery::Done(_) => {
                out.frames += 1;
                second_look = false;
                ring.pop(rec)?;
            }
            Delivery::Dropped => {
                second_look = false;
                ring.pop(rec)?;
            }
            Delivery::NoBuffers => {
                if second_look && (out.used, bufs.stashed()) == before {
                    // Told buffers came and found none: a bad available index.
                    out.blocked = true;
                    break;
                }
                match queue.enable_notification(mem) {
                    // Buffers came while the request was made: go on with them.
                    Ok(true) => {
                        let _ = queue.disable_notification(mem);
                        second_look = true;
                    }
                    _ => {
                        out.blocked = true;
                        break;
                    }
                }
            }
        }
    }
    out.interrupt = interrupt_wanted(queue, mem, out.used);
    Ok(out)
}
