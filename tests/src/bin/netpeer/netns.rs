//! The peer's network: the NIC of a PCI function moved into a network namespace of this
//! process's own (the emulated host's init namespace keeps no interface of it), with an
//! IPv4 address and the link up. rtnetlink messages come from `netlink-packet-route`.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The network interface of PCI function `bdf` (its driver's `net/<name>` under the
/// function, e.g. `virtio0/net/eth0`), waiting up to `wait` for the driver.
pub fn interface_of(bdf: &str, wait: Duration) -> Result<String, String> {
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    let deadline = Instant::now() + wait;
    loop {
        let mut dirs = vec![dev.join("net")];
        if let Ok(rd) = std::fs::read_dir(&dev) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("virtio") {
                    dirs.push(e.path().join("net"));
                }
            }
        }
        for d in dirs {
            if let Some(name) = std::fs::read_dir(&d)
                .ok()
                .and_then(|mut rd| rd.next())
                .and_then(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
            {
                return Ok(name);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{bdf} has no network interface after {} s (is its driver loaded?)",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn index_of(name: &str) -> Result<u32, String> {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .map_err(|e| format!("{name}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{name}'s index: {e}"))
}

/// An rtnetlink socket in the namespace the calling thread is in when it is made.
pub struct Rtnl(Socket);

impl Rtnl {
    pub fn open() -> Result<Self, String> {
        let mut s = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink: {e}"))?;
        s.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
        s.connect(&SocketAddr::new(0, 0))
            .map_err(|e| format!("netlink connect: {e}"))?;
        Ok(Rtnl(s))
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, msg: RouteNetlinkMessage, extra_flags: u16) -> Result<(), String> {
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
        let mut m = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.0
            .send(&buf, 0)
            .map_err(|e| format!("netlink send: {e}"))?;
        let mut rx: Vec<u8> = Vec::with_capacity(8192);
        self.0
            .recv(&mut rx, 0)
            .map_err(|e| format!("netlink recv: {e}"))?;
        let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx)
            .map_err(|e| format!("netlink answer: {e}"))?;
        match answer.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(code) => Err(format!(
                    "{}",
                    std::io::Error::from_raw_os_error(-code.get())
                )),
            },
            other => Err(format!("unexpected netlink answer {other:?}")),
        }
    }

    /// Moves interface `index` into the network namespace `ns`.
    pub fn move_to_netns(&self, name: &str, index: u32, ns: &impl AsRawFd) -> Result<(), String> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::NetNsFd(ns.as_raw_fd()));
        self.request(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| format!("moving {name} to the peer's namespace: {e}"))
    }

    /// Brings interface `index` up.
    pub fn up(&self, name: &str, index: u32) -> Result<(), String> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
            .map_err(|e| format!("{name} up: {e}"))
    }

    /// Adds `addr/prefix` to interface `index`.
    pub fn add_address(
        &self,
        name: &str,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), String> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes.push(AddressAttribute::Local(addr.into()));
        m.attributes.push(AddressAttribute::Address(addr.into()));
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| format!("{addr}/{prefix} on {name}: {e}"))
    }
}

/// Which interface the peer takes.
pub enum Nic {
    /// The interface of a PCI function.
    Pci(String),
    /// An interface by name (a veth end on the build machine).
    Name(String),
}

/// The loopback interface's index in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Moves the NIC of `bdf` into a new network namespace that the calling thread enters (call
/// it before starting threads: they inherit it), and gives it `addr/prefix`. Returns the
/// interface's name (the same inside) and MAC address. sysfs stays the initial namespace's,
/// so everything read from it is read before the move; the kernel keeps the index, which
/// nothing but loopback holds in a new namespace.
pub fn enter_with_nic(nic: &Nic, addr: Ipv4Addr, prefix: u8) -> Result<(String, String), String> {
    let name = match nic {
        Nic::Pci(bdf) => interface_of(bdf, Duration::from_secs(30))?,
        Nic::Name(n) => n.clone(),
    };
    let index = index_of(&name)?;
    let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .map_err(|e| format!("{name}'s address: {e}"))?
        .trim()
        .to_string();
    let outside = Rtnl::open()?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    let ns = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("/proc/thread-self/ns/net: {e}"))?;
    outside.move_to_netns(&name, index, &ns)?;
    let inside = Rtnl::open()?;
    inside.up("lo", LOOPBACK_INDEX)?;
    inside.add_address(&name, index, addr, prefix)?;
    inside.up(&name, index)?;
    Ok((name, mac))
}
