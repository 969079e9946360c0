//! virtio_wl round-trip benchmark guest (static /init): N round trips of a 64-byte message
//! with the host peer over the unnamed context, without and with an fd (a shm vfd) attached.
//! Prints `wl-bench: rtt_ns=<x> fd_rtt_ns=<y>`, then powers off. Used by
//! rootfs/guest/virtio_wl/smoke/run_l1.sh with l1_bench.c.

use std::os::fd::AsRawFd;
use std::time::Instant;

use bulkhead_wl::Wl;

const ROUNDS: u32 = 300;

fn load(path: &str) {
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: finit_module with an open fd and an empty parameter string.
        unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    }
}

fn run() -> Result<(), bulkhead_wl::WlError> {
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "virtio_wl",
    ] {
        load(&format!("/lib/{m}.ko"));
    }
    let wl = Wl::open()?;
    let ctx = wl.connect("")?;
    let shm = wl.alloc(4096)?;
    let msg = [7u8; 64];
    let mut per = [0u128; 2];
    for (i, with_fd) in [false, true].into_iter().enumerate() {
        for _ in 0..20 {
            ctx.send(&msg, &[])?;
            ctx.recv()?;
        }
        let t = Instant::now();
        for _ in 0..ROUNDS {
            if with_fd {
                ctx.send(&msg, &[shm.fd()])?;
            } else {
                ctx.send(&msg, &[])?;
            }
            let (d, _) = ctx.recv()?;
            if d.len() != msg.len() {
                println!("wl-bench: short echo {}", d.len());
            }
        }
        per[i] = t.elapsed().as_nanos() / u128::from(ROUNDS);
    }
    println!("wl-bench: rtt_ns={} fd_rtt_ns={}", per[0], per[1]);
    ctx.send(b"quit", &[])?;
    if std::env::args().nth(1).as_deref() == Some("close") {
        drop(shm);
        drop(ctx);
    }
    Ok(())
}

fn main() {
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
    if let Err(e) = run() {
        println!("wl-bench: FAIL {e}");
    }
    // SAFETY: powering off is what this init is for.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}
