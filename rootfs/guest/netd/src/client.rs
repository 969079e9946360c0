//! One app VM: its connection, its ring (mapped from the memfd its VMM sent in the hello),
//! and its TAP on the bridge. Frames from the TX ring are copied out, checked (the source
//! address must be the MAC the VMM declared: no app VM speaks for another) and written to
//! the TAP, whose kernel side checks the header and the frame again; frames the TAP hands
//! over are read straight into the RX ring. Every value read from the ring was checked by
//! `bulkhead-netring`; whatever is wrong with a client ends that client only.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use bulkhead_netring::{
    attach, features, Consumer, Hello, Mapping, Producer, RingInfo, Side, MAX_PAYLOAD,
};

use crate::bridge::Bridge;
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::transport::{Conn, Recv};

/// How long a new connection may take to send its hello.
pub const HELLO_WAIT: Duration = Duration::from_secs(5);
/// Frames moved per client and direction before the others get their turn.
pub const BATCH: usize = 64;

/// Counters of one client.
#[derive(Debug, Default, Clone)]
pub struct ClientStats {
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Frames whose source address was not the client's MAC (dropped).
    pub tx_spoofed: u64,
    /// Frames the kernel refused (a bad header or length) or too short to carry addresses.
    pub tx_refused: u64,
    /// Frames read from the TAP into the RX ring.
    pub rx_frames: u64,
    /// Doorbells sent.
    pub kicks: u64,
}

struct Running {
    _map: Mapping,
    mem: bulkhead_netring::Mem,
    info: RingInfo,
    tx: Consumer,
    rx: Producer,
    tap: Tap,
    features: u64,
    /// The RX ring was full: the TAP is not read until the client frees space.
    rx_blocked: bool,
}

enum State {
    AwaitHello(Instant),
    Running(Box<Running>),
}

/// Why a client ended.
#[derive(Debug, thiserror::Error)]
pub enum Gone {
    /// Its VM hung up.
    #[error("hung up")]
    Hangup,
    /// It broke the protocol or the ring.
    #[error("{0}")]
    Broken(String),
}

/// One client.
pub struct Client {
    /// The connection's name (`wl-conn-3`).
    pub name: String,
    conn: Box<dyn Conn>,
    state: State,
    /// A doorbell that could not go out yet.
    kick_pending: bool,
    /// Counters.
    pub stats: ClientStats,
    /// A batch limit was hit: there is more to do at once.
    pub busy: bool,
    buf: Vec<u8>,
}

impl Client {
    /// A new connection, waiting for its hello.
    pub fn new(name: String, conn: Box<dyn Conn>) -> Self {
        Self {
            name,
            conn,
            state: State::AwaitHello(Instant::now()),
            kick_pending: false,
            stats: ClientStats::default(),
            busy: false,
            buf: vec![0u8; MAX_PAYLOAD],
        }
    }

    /// The connection's fd (doorbells, hang-up).
    pub fn conn_fd(&self) -> BorrowedFd<'_> {
        self.conn.poll_fd()
    }

    /// The TAP's fd, when frames from it are wanted (running, RX ring not full).
    pub fn tap_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            State::Running(r) if !r.rx_blocked => Some(r.tap.as_fd()),
            _ => None,
        }
    }

    /// The TAP's name and the client's MAC, once running.
    pub fn describe(&self) -> Option<(String, [u8; 6])> {
        match &self.state {
            State::Running(r) => Some((r.tap.name().to_string(), r.info.mac)),
            State::AwaitHello(_) => None,
        }
    }

    /// True while a doorbell waits to be retried.
    pub fn kick_pending(&self) -> bool {
        self.kick_pending
    }

    /// A client that never sent its hello is dropped after [`HELLO_WAIT`].
    pub fn expired(&self) -> bool {
        matches!(self.state, State::AwaitHello(t) if t.elapsed() > HELLO_WAIT)
    }

    fn hello(
        &mut self,
        data: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
        bridge: &Bridge,
    ) -> Result<(), Gone> {
        let hello = Hello::decode(data).map_err(|e| Gone::Broken(e.to_string()))?;
        let [fd] = <[_; 1]>::try_from(fds)
            .map_err(|f: Vec<_>| Gone::Broken(format!("hello with {} fds, not 1", f.len())))?;
        let len = usize::try_from(hello.ring_len).map_err(|e| Gone::Broken(e.to_string()))?;
        let map = Mapping::map(fd.as_fd(), len).map_err(|e| Gone::Broken(e.to_string()))?;
        let mem = map.mem();
        let info = attach(mem).map_err(|e| Gone::Broken(e.to_string()))?;
        if info.mac[0] & 1 != 0 {
            return Err(Gone::Broken("a multicast MAC".into()));
        }
        let tap = Tap::create("bhtap%d").map_err(|e| Gone::Broken(format!("tap: {e}")))?;
        bridge
            .add_port(tap.name())
            .map_err(|e| Gone::Broken(format!("bridge port {}: {e}", tap.name())))?;
        self.state = State::Running(Box::new(Running {
            tx: Consumer::new(mem, &info, Side::Tx),
            rx: Producer::new(mem, &info, Side::Rx),
            _map: map,
            mem,
            info,
            tap,
            features: u64::MAX, // set below
            rx_blocked: false,
        }));
        Ok(())
    }

    /// Reads the connection: the hello first, then doorbells (their content does not
    /// matter: any message means "look at the rings").
    pub fn read_conn(&mut self, bridge: &Bridge) -> Result<(), Gone> {
        loop {
            match self.conn.recv() {
                Ok(Recv::Nothing) => return Ok(()),
                Ok(Recv::Hangup) | Err(_) => return Err(Gone::Hangup),
                Ok(Recv::Message(data, fds)) => match self.state {
                    State::AwaitHello(_) => self.hello(&data, fds, bridge)?,
                    State::Running(ref mut r) => {
                        // A doorbell: the client may be waiting for room again.
                        r.rx_blocked = false;
                    }
                },
            }
        }
    }

    fn kick(&mut self) -> Result<(), Gone> {
        match self.conn.kick() {
            Ok(true) => {
                self.kick_pending = false;
                self.stats.kicks += 1;
                Ok(())
            }
            Ok(false) => {
                self.kick_pending = true;
                Ok(())
            }
            Err(_) => Err(Gone::Hangup),
        }
    }

    /// Moves up to [`BATCH`] frames each way and rings the client's doorbell if it sleeps.
    pub fn pump(&mut self) -> Result<(), Gone> {
        let State::Running(r) = &mut self.state else {
            return Ok(());
        };
        let broken = |e: bulkhead_netring::RingError| Gone::Broken(e.to_string());
        // The offloads the client's guest accepted decide what the TAP may hand us.
        let f = features(r.mem).map_err(broken)?;
        if f != r.features {
            r.tap
                .set_offloads(f)
                .map_err(|e| Gone::Broken(format!("offloads {f:#x}: {e}")))?;
            r.features = f;
        }
        let mut busy = false;
        // TX: ring → TAP. Each frame is copied out first: the client's VMM cannot change
        // it between the check and the write.
        let mut n = 0;
        while let Some(rec) = r.tx.peek().map_err(broken)? {
            if n == BATCH {
                busy = true;
                break;
            }
            let len = rec.len();
            let Some(frame) = self.buf.get_mut(..len) else {
                // The ring bounds records by MAX_PAYLOAD, the buffer's size.
                return Err(Gone::Broken(format!("a {len}-byte record")));
            };
            // SAFETY: the record is `len` bytes inside the mapping (checked by the ring);
            // `frame` is ours and exactly `len` bytes long.
            unsafe { std::ptr::copy_nonoverlapping(rec.ptr(), frame.as_mut_ptr(), len) };
            r.tx.pop(rec).map_err(broken)?;
            n += 1;
            let src = frame.get(VNET_HDR_LEN + 6..VNET_HDR_LEN + 12);
            match src {
                None => self.stats.tx_refused += 1,
                Some(m) if m != r.info.mac => self.stats.tx_spoofed += 1,
                Some(_) => match r.tap.write(frame) {
                    Ok(()) => self.stats.tx_frames += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        // The TAP is down (no carrier): the frame is dropped.
                        self.stats.tx_refused += 1;
                    }
                    Err(_) => self.stats.tx_refused += 1,
                },
            }
        }
        let mut kick = r.tx.space_kick_needed().map_err(broken)?;
        if !busy && r.tx.prepare_sleep().map_err(broken)? {
            // Asleep until the client's doorbell.
        } else {
            busy = true;
        }
        // RX: TAP → ring, straight into the reserved record.
        let mut n = 0;
        while !r.rx_blocked {
            if n == BATCH {
                busy = true;
                break;
            }
            let Some(res) = r.rx.reserve(MAX_PAYLOAD).map_err(broken)? else {
                if !r.rx.wait_for_space(MAX_PAYLOAD).map_err(broken)? {
                    r.rx_blocked = true;
                }
                continue;
            };
            // SAFETY: the reservation is `res.len()` writable bytes of the mapping, ours
            // until committed.
            match unsafe { r.tap.read_into(res.ptr(), res.len()) } {
                Ok(Some(len)) => {
                    r.rx.commit(res, len).map_err(broken)?;
                    self.stats.rx_frames += 1;
                    n += 1;
                }
                Ok(None) => break,
                Err(e) => return Err(Gone::Broken(format!("tap read: {e}"))),
            }
        }
        kick |= r.rx.kick_needed().map_err(broken)?;
        self.busy = busy;
        if kick || self.kick_pending {
            self.kick()?;
        }
        Ok(())
    }
}
