//! The loop: new connections, each client's doorbells and TAP, in turn. One thread; a
//! client that floods gets [`crate::client::BATCH`] frames per turn like every other, and
//! a client that breaks the protocol is dropped alone.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::bridge::Bridge;
use crate::client::{Client, Gone};
use crate::transport::Accept;

/// Most clients at once (each costs a TAP, a ring mapping and a KVM memory slot).
pub const MAX_CLIENTS: usize = 64;

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn bye(c: &Client, why: &Gone) {
    let s = &c.stats;
    println!(
        "netd: {} gone ({why}): tx {} frames, {} spoofed, {} refused; rx {} frames; {} doorbells",
        c.name, s.tx_frames, s.tx_spoofed, s.tx_refused, s.rx_frames, s.kicks
    );
}

/// Serves connections from `accept` on `bridge` until `stop` says so (checked each turn).
pub fn serve(
    accept: &mut dyn Accept,
    bridge: &Bridge,
    stop: &dyn Fn() -> bool,
) -> Result<(), String> {
    let mut clients: Vec<Client> = Vec::new();
    while !stop() {
        let mut pfds = vec![libc::pollfd {
            fd: accept.poll_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let pfd = |fd: Option<BorrowedFd<'_>>| libc::pollfd {
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        for c in &clients {
            pfds.push(pfd(Some(c.conn_fd())));
            pfds.push(pfd(c.tap_fd()));
        }
        let hurry = clients.iter().any(|c| c.busy);
        let retry = clients.iter().any(|c| c.kick_pending());
        let timeout = if hurry {
            0
        } else if retry {
            5
        } else {
            500
        };
        // SAFETY: `pfds` is a valid array for the call; every fd in it is owned by the
        // accept source or a client, all alive across it (-1 entries are ignored).
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        let mut gone: Vec<(usize, Gone)> = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            let conn_ready = pfds.get(1 + 2 * i).is_some_and(|p| p.revents != 0);
            let was_running = c.describe().is_some();
            let r = if conn_ready {
                c.read_conn(bridge)
            } else {
                Ok(())
            };
            let r = r.and_then(|()| {
                if !was_running {
                    if let Some((tap, mac)) = c.describe() {
                        println!(
                            "netd: {} ({}) joined: {tap} on {}",
                            c.name,
                            mac_str(&mac),
                            bridge.name
                        );
                    }
                }
                c.pump()
            });
            match r {
                Ok(()) if c.expired() => gone.push((i, Gone::Broken("no hello in time".into()))),
                Ok(()) => {}
                Err(e) => gone.push((i, e)),
            }
        }
        for (i, why) in gone.into_iter().rev() {
            let c = clients.remove(i);
            bye(&c, &why);
        }
        if pfds.first().is_some_and(|p| p.revents != 0) {
            loop {
                match accept.accept() {
                    Ok(Some((conn, name))) => {
                        if clients.len() >= MAX_CLIENTS {
                            println!("netd: {name} refused: {MAX_CLIENTS} clients already");
                            continue;
                        }
                        clients.push(Client::new(name, conn));
                    }
                    Ok(None) => break,
                    Err(e) => return Err(format!("accepting: {e}")),
                }
            }
        }
    }
    Ok(())
}

/// How long to wait for the NIC's driver when the uplink is found automatically.
pub const UPLINK_WAIT: Duration = Duration::from_secs(20);
