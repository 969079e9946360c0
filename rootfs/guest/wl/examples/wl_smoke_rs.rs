//! The wl_smoke exchange (rootfs/guest/virtio_wl/smoke) written with bulkhead-wl: a static
//! /init for a throw-away guest. Loads the virtio modules and virtio_wl.ko from /lib, then
//! connects the unnamed context, sends data + shared memory + a pipe, receives the host's
//! memfd, checks zero-copy both ways and the pipe's data and EOF. Prints "WL-SMOKE OK" or
//! "WL-SMOKE FAIL: ..." and powers off. Built with `-C target-feature=+crt-static`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use bulkhead_wl::{SharedMemory, Wl};

fn load(path: &str) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: finit_module with an open fd and an empty, NUL-terminated parameter string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("load {path}: {e}"));
        }
    }
    Ok(())
}

fn check(ok: bool, what: &str) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

fn run() -> Result<(), String> {
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
    check(
        wl.connect("no-such-socket").is_err(),
        "unknown name refused",
    )?;
    let ctx = wl.connect("").map_err(|e| e.to_string())?;
    let mut shm = wl.alloc(5000).map_err(|e| e.to_string())?;
    check(shm.as_slice().len() == 5000, "shm length")?;
    shm.as_mut_slice()[..15].copy_from_slice(b"guest-shm-data\0");
    let pipe = wl.pipe_read().map_err(|e| e.to_string())?;
    ctx.send(b"hello from guest", &[shm.fd(), pipe.fd()])
        .map_err(|e| e.to_string())?;
    println!("wl-smoke-rs: sent");
    let (data, mut fds) = ctx.recv().map_err(|e| e.to_string())?;
    check(data == b"hello from host", "recv data")?;
    check(fds.len() == 1, "recv one fd")?;
    let mut host = SharedMemory::map(fds.remove(0), 8192).map_err(|e| e.to_string())?;
    check(
        host.as_slice().starts_with(b"host-memfd\0"),
        "host memfd contents",
    )?;
    check(
        shm.as_slice()[100..114] == *b"host-was-here\0",
        "host write visible in guest shm",
    )?;
    host.as_mut_slice()[200..223].copy_from_slice(b"guest-wrote-host-memfd\0");
    let mut got = Vec::new();
    (&pipe)
        .read_to_end(&mut got)
        .map_err(|e| format!("pipe read: {e}"))?;
    check(got == b"pipe-data", "pipe data then EOF")?;
    (&ctx).write_all(b"done").map_err(|e| e.to_string())?;
    let mut ok = [0u8; 2];
    (&ctx).read_exact(&mut ok).map_err(|e| e.to_string())?;
    check(&ok == b"ok", "final ok")?;
    ctx.set_nonblocking(true).map_err(|e| e.to_string())?;
    check(
        matches!(ctx.recv(), Err(bulkhead_wl::WlError::Io { err, .. }) if err.kind() == std::io::ErrorKind::WouldBlock),
        "non-blocking recv",
    )?;
    Ok(())
}

fn main() {
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
    match run() {
        Ok(()) => println!("WL-SMOKE OK (bulkhead-wl)"),
        Err(e) => println!("WL-SMOKE FAIL: {e}"),
    }
    // SAFETY: powering off is what this init is for.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
