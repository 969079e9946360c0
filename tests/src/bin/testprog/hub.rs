//! The guest programs of the hub end-to-end test, run inside L2 guests whose VMMs have hub
//! channels (`vm =` in the L1 system.toml):
//!
//! - `hub-provider SERVICE`: provides SERVICE (listener context `listen:SERVICE`), takes one
//!   connection through the faux accept, receives a shared buffer of numbers, squares them
//!   in place, answers `squared`, and waits for the client's `bye`.
//! - `hub-client SERVICE@PROVIDER`: connects, allocates a page of shared memory, writes 1..=N,
//!   sends it, and after `squared` reads the squares from its own mapping (the provider wrote
//!   the same pages: zero copy across two VMs through the hub).
//! - `hub-refused SERVICE@PROVIDER`: a VM the policy grants nothing: its connect must fail,
//!   and fail exactly like a name that does not exist at all.
//! - `hub-audit PATH VM` (on L1): waits for the hub's audit record of VM's refused connect
//!   and prints its reason and rules.

use std::time::{Duration, Instant};

use crate::testprog_wl::e;

type Res = Result<String, String>;

/// How many numbers travel in the shared page.
const N: usize = 64;

fn read_u64(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(i * 8..i * 8 + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn write_u64(b: &mut [u8], i: usize, v: u64) {
    if let Some(s) = b.get_mut(i * 8..i * 8 + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The provider guest.
pub fn provider(service: &str) -> Res {
    let wl = bulkhead_wl::Wl::open().map_err(e("open /dev/wl0"))?;
    let mut listener =
        bulkhead_wl::Listener::bind(&wl, &format!("listen:{service}")).map_err(e("listen"))?;
    println!("hub-provider: providing {service}");
    let (stream, name) = listener.accept().map_err(e("accept"))?;
    println!("hub-provider: accepted {name}");
    let (data, fds) = stream.recv().map_err(e("recv"))?;
    if data != b"square" || fds.len() != 1 {
        return Err(format!(
            "got {:?} with {} fds",
            String::from_utf8_lossy(&data),
            fds.len()
        ));
    }
    let fd = fds.into_iter().next().ok_or("no fd")?;
    let mut shm = bulkhead_wl::SharedMemory::map(fd, 4096).map_err(e("map the client's buffer"))?;
    for i in 0..N {
        let v = read_u64(shm.as_slice(), i);
        write_u64(shm.as_mut_slice(), i, v.wrapping_mul(v));
    }
    stream.send(b"squared", &[]).map_err(e("send"))?;
    let (bye, _) = stream.recv().map_err(e("recv bye"))?;
    if bye != b"bye" {
        return Err(format!(
            "expected bye, got {:?}",
            String::from_utf8_lossy(&bye)
        ));
    }
    Ok(format!(
        "hub-provider PASS: squared {N} numbers in place for {name}"
    ))
}

/// The client guest.
pub fn client(target: &str) -> Res {
    let wl = bulkhead_wl::Wl::open().map_err(e("open /dev/wl0"))?;
    // The provider's guest may still be booting: its service appears when it listens.
    let deadline = Instant::now() + Duration::from_secs(600);
    let stream = loop {
        match wl.connect(target) {
            Ok(s) => break s,
            Err(err) if Instant::now() < deadline => {
                log_once(&format!(
                    "hub-client: {target} not there yet ({err}); retrying"
                ));
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(err) => return Err(format!("connect {target}: {err}")),
        }
    };
    println!("hub-client: connected to {target}");
    let mut shm = wl.alloc(4096).map_err(e("alloc"))?;
    for i in 0..N {
        write_u64(shm.as_mut_slice(), i, i as u64 + 1);
    }
    stream.send(b"square", &[shm.fd()]).map_err(e("send"))?;
    let (data, _) = stream.recv().map_err(e("recv"))?;
    if data != b"squared" {
        return Err(format!("got {:?}", String::from_utf8_lossy(&data)));
    }
    for i in 0..N {
        let want = (i as u64 + 1) * (i as u64 + 1);
        let got = read_u64(shm.as_slice(), i);
        if got != want {
            return Err(format!("number {i}: {got}, want {want}"));
        }
    }
    stream.send(b"bye", &[]).map_err(e("send bye"))?;
    Ok(format!(
        "hub-client PASS: the provider squared {N} numbers in our own shared page"
    ))
}

fn log_once(msg: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| println!("{msg}"));
}

/// The guest without a grant.
pub fn refused(target: &str) -> Res {
    let wl = bulkhead_wl::Wl::open().map_err(e("open /dev/wl0"))?;
    let denied = match wl.connect(target) {
        Ok(_) => return Err(format!("connect {target} succeeded without a grant")),
        Err(err) => err.to_string(),
    };
    let missing = match wl.connect("no-such-service@nowhere") {
        Ok(_) => return Err("a service that does not exist connected".into()),
        Err(err) => err.to_string(),
    };
    if denied != missing {
        return Err(format!(
            "the refusal ({denied}) differs from a missing name ({missing})"
        ));
    }
    Ok(format!(
        "hub-refused PASS: {target} refused with the uniform error ({denied})"
    ))
}

/// On L1: the audit record of `vm`'s refused connect.
pub fn audit(path: &str, vm: &str) -> Res {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let src = format!("\"src\":\"{vm}\"");
        for line in text.lines() {
            if line.contains(&src)
                && line.contains("\"verb\":\"connect\"")
                && line.contains("\"allowed\":false")
            {
                use std::os::unix::fs::MetadataExt;
                let owner = std::fs::metadata(path).map(|m| m.uid()).unwrap_or(u32::MAX);
                println!("hub-audit: the audit log is owned by uid {owner}");
                return Ok(format!("hub-audit: {line}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no denied connect by {vm} in {path}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `hub-guest`: one guest image for every role; the VMM's kernel command line chooses it
/// (`hub.role=provider|client|refused hub.target=SERVICE[@PROVIDER]`).
pub fn guest() -> Res {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(e("/proc/cmdline"))?;
    let arg = |key: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    let target = arg("hub.target=").ok_or("no hub.target= on the command line")?;
    match arg("hub.role=").as_deref() {
        Some("provider") => provider(&target),
        Some("client") => client(&target),
        Some("refused") => refused(&target),
        other => Err(format!(
            "hub.role={other:?}: want provider, client or refused"
        )),
    }
}
