//! One client's session on the app side: its Unix socket on one end, its own virtio_wl
//! connection on the other, one thread. Requests are read, decoded and translated as they
//! come and sent on at once (a blocking send: a stalled connection stalls this client
//! only); events are queued for the client and written as its socket takes them, and while
//! too much waits the proxy stops reading the connection (back-pressure, this client only).

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::state::{error_event, ClientState, Fault, Out};
use crate::batch::{self, OutQueue};
use crate::sock;
use crate::stats::Stats;
use crate::transport::{Channel, Transport};
use crate::wire;

/// Events waiting for a slow client past which the proxy stops reading its connection.
const CLIENT_BACKLOG: usize = 4 << 20;
/// Fds received and not yet used by a message, past which a peer is misbehaving.
const MAX_PENDING_FDS: usize = 1024;

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client closed its socket.
    ClientClosed,
    /// The compositor's side closed the connection.
    PeerClosed,
    /// The client broke the protocol (it was told).
    Protocol(String),
    /// The compositor's side sent something untranslatable.
    Compositor(String),
    /// A system call failed.
    Io(String),
}

/// A stream of bytes and fds, cut into messages.
#[derive(Default)]
struct Inbox {
    bytes: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Inbox {
    /// Takes the complete messages, handing each to `f`.
    fn drain(
        &mut self,
        mut f: impl FnMut(&[u8], &mut VecDeque<OwnedFd>) -> Result<(), Fault>,
        request: bool,
    ) -> Result<(), Fault> {
        let mut at = 0;
        let r = loop {
            let rest = self.bytes.get(at..).unwrap_or_default();
            let h = match wire::header(rest) {
                Ok(Some(h)) => h,
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(if request {
                        Fault::Protocol {
                            object: 1,
                            code: super::state::code::INVALID_METHOD,
                            message: e.to_string(),
                        }
                    } else {
                        Fault::Compositor(e.to_string())
                    })
                }
            };
            let Some(msg) = rest.get(..h.size) else {
                break Ok(());
            };
            if let Err(e) = f(msg, &mut self.fds) {
                break Err(e);
            }
            at += h.size;
        };
        self.bytes.drain(..at.min(self.bytes.len()));
        r
    }
}

/// Runs one client until it or the connection ends.
pub fn run(
    client: UnixStream,
    far: Box<dyn Channel>,
    transport: Arc<dyn Transport>,
    stats: Arc<Stats>,
) -> End {
    let mut state = ClientState::new(transport, stats.clone());
    let mut to_client = OutQueue::default();
    let end = run_loop(&client, far.as_ref(), &mut state, &mut to_client);
    if let End::Protocol(m) | End::Compositor(m) = &end {
        log::warn!("client ended: {m}");
    }
    log::info!(
        "client closed ({end:?}): commits={} copied_bytes={}",
        state.commits,
        state.copied
    );
    // Whatever the client has not read yet (an error event, say) gets one last chance.
    let _ = to_client.flush(client.as_fd());
    end
}

fn run_loop(
    client: &UnixStream,
    far: &dyn Channel,
    state: &mut ClientState,
    to_client: &mut OutQueue,
) -> End {
    if let Err(e) = client.set_nonblocking(true) {
        return End::Io(e.to_string());
    }
    let mut cin = Inbox::default();
    let mut fin = Inbox::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let client_ev = libc::POLLIN
            | if to_client.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
        let far_ev = if to_client.len() < CLIENT_BACKLOG {
            libc::POLLIN
        } else {
            0
        };
        let rev = match sock::poll(&[(client.as_fd(), client_ev), (far.poll_fd(), far_ev)], -1) {
            Ok(r) => r,
            Err(e) => return End::Io(format!("poll: {e}")),
        };
        let (crev, frev) = (
            rev.first().copied().unwrap_or(0),
            rev.get(1).copied().unwrap_or(0),
        );
        let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if crev & ready != 0 {
            let got = match sock::recv_with_fds(client.as_fd(), &mut buf, true) {
                Ok(x) => Some(x),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => return End::Io(format!("client socket: {e}")),
            };
            if let Some((0, fds)) = &got {
                if fds.is_empty() {
                    return End::ClientClosed;
                }
            }
            if let Some((n, fds)) = got {
                cin.bytes
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                cin.fds.extend(fds);
                let mut out: Vec<Out> = Vec::new();
                let r = if cin.fds.len() > MAX_PENDING_FDS {
                    Err(Fault::Protocol {
                        object: 1,
                        code: super::state::code::INVALID_METHOD,
                        message: "too many fds".into(),
                    })
                } else {
                    cin.drain(|m, fds| state.request(m, fds, &mut out), true)
                };
                // What was translated before a fault still goes (it was valid).
                if let Err(e) = batch::send_all(far, out) {
                    return End::Io(format!("send to the compositor: {e}"));
                }
                if let Err(f) = r {
                    return fault(f, to_client);
                }
            }
        }
        if frev & ready != 0 {
            let got = match far.recv() {
                Ok(x) => Some(x),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => return End::Io(format!("connection: {e}")),
            };
            if let Some((data, fds)) = &got {
                if data.is_empty() && fds.is_empty() {
                    return End::PeerClosed;
                }
            }
            if let Some((data, fds)) = got {
                fin.bytes.extend_from_slice(&data);
                fin.fds.extend(fds);
                let mut out: Vec<Out> = Vec::new();
                let r = if fin.fds.len() > MAX_PENDING_FDS {
                    Err(Fault::Compositor("too many fds".into()))
                } else {
                    fin.drain(|m, fds| state.event(m, fds, &mut out), false)
                };
                for m in out {
                    to_client.push(m.bytes, m.fds);
                }
                if let Err(f) = r {
                    return fault(f, to_client);
                }
            }
        }
        if !to_client.is_empty() {
            if let Err(e) = to_client.flush(client.as_fd()) {
                return End::Io(format!("client socket: {e}"));
            }
        }
    }
}

fn fault(f: Fault, to_client: &mut OutQueue) -> End {
    match f {
        Fault::Protocol {
            object,
            code,
            message,
        } => {
            to_client.push(error_event(object, code, &message), vec![]);
            End::Protocol(format!(
                "protocol error on object {object} (code {code}): {message}"
            ))
        }
        Fault::Compositor(m) => End::Compositor(m),
    }
}
