//! Stable names for virtio disks: `/dev/disk/by-id/virtio-<serial>` → `../../vdX` for every
//! virtio-blk disk whose device gives a serial, the name udev's persistent-storage rules
//! give it (there is no udev on a Bulkhead host). A host image refers to the guests' root
//! disks by these names (`/var/lib/bulkhead/guests/<guest>.root` links to one), whatever
//! order the disks were probed in.

use std::path::Path;

use log::{debug, info, warn};

/// Longest serial a virtio-blk device reports (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL: usize = 20;

/// Is `serial` safe as a file name component (what udev would keep unchanged)?
pub fn usable_serial(serial: &str) -> bool {
    !serial.is_empty()
        && serial.len() <= MAX_SERIAL
        && serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !serial.starts_with('.')
}

/// Makes `<dev>/disk/by-id/virtio-<serial>` for every `vd*` block device in
/// `<sys>/block` with a usable serial; returns the links it made. Failures are logged, never
/// fatal.
pub fn link_virtio_serials(sys: &Path, dev: &Path) -> Vec<String> {
    let mut made = Vec::new();
    let Ok(entries) = std::fs::read_dir(sys.join("block")) else {
        return made;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    let by_id = dev.join("disk/by-id");
    for name in names {
        let serial_path = sys.join("block").join(&name).join("serial");
        let serial = match std::fs::read_to_string(&serial_path) {
            Ok(s) => s.trim_end_matches(['\n', '\0']).trim().to_string(),
            Err(e) => {
                debug!("{}: {e}", serial_path.display());
                continue;
            }
        };
        if serial.is_empty() {
            continue;
        }
        if !usable_serial(&serial) {
            warn!("{name}: serial {serial:?} is not usable as a name; no by-id link");
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(&by_id) {
            warn!("{}: {e}", by_id.display());
            return made;
        }
        let link = by_id.join(format!("virtio-{serial}"));
        let _ = std::fs::remove_file(&link);
        match std::os::unix::fs::symlink(format!("../../{name}"), &link) {
            Ok(()) => {
                info!("disk {name}: {}", link.display());
                made.push(format!("virtio-{serial}"));
            }
            Err(e) => warn!("{}: {e}", link.display()),
        }
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_virtio_disk_with_a_serial_gets_its_by_id_link() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        for (n, serial) in [
            ("vda", "\n"),
            ("vdb", "bh-root-0123456789\n"),
            ("vdc", "../../etc\n"),
            ("sda", "x\n"),
        ] {
            std::fs::create_dir_all(sys.join("block").join(n)).unwrap();
            std::fs::write(sys.join("block").join(n).join("serial"), serial).unwrap();
        }
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vdb"), b"").unwrap();
        let made = link_virtio_serials(&sys, &dev);
        assert_eq!(made, ["virtio-bh-root-0123456789"]);
        let link = dev.join("disk/by-id/virtio-bh-root-0123456789");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../../vdb"));
        assert!(link.exists(), "the link resolves");
        // Again (a restart of the step) replaces, never fails.
        assert_eq!(link_virtio_serials(&sys, &dev).len(), 1);
        assert!(!usable_serial("a/b") && !usable_serial(".x") && !usable_serial(""));
    }
}
