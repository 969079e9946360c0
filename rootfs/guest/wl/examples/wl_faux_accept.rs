//! Faux-accept demo guest (static /init): `-- server` listens on the context named "listen"
//! and answers one connection accepted through `Listener`; `-- client` connects to
//! "wayland" and exchanges a ping. Prints "WL-FAUX <role> OK" or "WL-FAUX <role> FAIL: ..."
//! and powers off. Used by rootfs/guest/virtio_wl/smoke/run_l1_faux.sh.

use std::os::fd::AsRawFd;

use bulkhead_wl::{Listener, Wl};

fn load(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: finit_module with an open fd and an empty, NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
        return Err(format!("load {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn run(role: &str) -> Result<(), String> {
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_wl",
    ] {
        load(&format!("/lib/{m}.ko"))?;
    }
    let wl = Wl::open().map_err(|e| e.to_string())?;
    let e = |e: bulkhead_wl::WlError| e.to_string();
    if role == "server" {
        let mut l = Listener::bind(&wl, "listen").map_err(e)?;
        println!("wl-faux: server listening");
        let (conn, name) = l.accept().map_err(e)?;
        println!("wl-faux: server accepted {name}");
        let (data, _) = conn.recv().map_err(e)?;
        if data != b"ping" {
            return Err(format!("server got {data:?}"));
        }
        let mut shm = wl.alloc(4096).map_err(e)?;
        shm.as_mut_slice()[..6].copy_from_slice(b"shared");
        conn.send(b"pong", &[]).map_err(e)?;
        let (bye, _) = conn.recv().map_err(e)?;
        if bye != b"bye" {
            return Err(format!("server got {bye:?}"));
        }
    } else {
        let conn = wl.connect("wayland").map_err(e)?;
        conn.send(b"ping", &[]).map_err(e)?;
        let (data, _) = conn.recv().map_err(e)?;
        if data != b"pong" {
            return Err(format!("client got {data:?}"));
        }
        conn.send(b"bye", &[]).map_err(e)?;
    }
    Ok(())
}

fn main() {
    let role = std::env::args().nth(1).unwrap_or_else(|| "client".into());
    let _ = std::fs::create_dir_all("/dev");
    // SAFETY: static NUL-terminated strings; mounting devtmpfs on /dev.
    unsafe {
        libc::mount(
            c"devtmpfs".as_ptr(),
            c"/dev".as_ptr(),
            c"devtmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    match run(&role) {
        Ok(()) => println!("WL-FAUX {role} OK"),
        Err(e) => println!("WL-FAUX {role} FAIL: {e}"),
    }
    // SAFETY: powering off is what this init is for.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
