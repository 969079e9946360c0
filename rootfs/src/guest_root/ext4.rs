//! Packing a tree into an ext4 image with `mkfs.ext4 -d` (e2fsprogs): no journal (the
//! guest mounts it read-only), no reserved blocks, sized to the tree plus a margin.

use std::path::Path;
use std::process::Command;

use super::RootError;

/// The image's volume label.
pub const LABEL: &str = "bulkhead-root";

/// The size in KiB and the inode count for a tree of `bytes` and `inodes` (see
/// [`super::tree::usage`]): a sixth more blocks for ext4's own metadata, and room for a
/// tenth more inodes.
pub fn geometry(bytes: u64, inodes: u64) -> (u64, u64) {
    let kib = (bytes / 1024) + (bytes / 1024) / 6 + 16 * 1024;
    let inodes = inodes + inodes / 10 + 1024;
    (kib, inodes)
}

/// The `mkfs.ext4` arguments for `tree` → `image`.
pub fn mkfs_args(tree: &Path, image: &Path, kib: u64, inodes: u64) -> Vec<String> {
    vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        "4096".into(),
        "-L".into(),
        LABEL.into(),
        "-O".into(),
        "^has_journal".into(),
        "-m".into(),
        "0".into(),
        "-N".into(),
        inodes.to_string(),
        "-E".into(),
        "root_owner=0:0".into(),
        "-d".into(),
        tree.display().to_string(),
        image.display().to_string(),
        format!("{kib}k"),
    ]
}

/// Writes `image` from `tree`.
pub fn pack(tree: &Path, image: &Path) -> Result<(), RootError> {
    let (bytes, inodes) = super::tree::usage(tree)?;
    let (kib, inodes) = geometry(bytes, inodes);
    let _ = std::fs::remove_file(image);
    super::run(Command::new("mkfs.ext4").args(mkfs_args(tree, image, kib, inodes)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_has_room_for_the_tree_and_its_metadata() {
        let (kib, inodes) = geometry(600 << 20, 20_000);
        assert!(kib * 1024 > 600 << 20);
        assert!(kib * 1024 < 720 << 20, "{kib}");
        assert!(inodes > 22_000);
        let args = mkfs_args(Path::new("/t"), Path::new("/i.ext4"), kib, inodes).join(" ");
        assert!(args.contains("-O ^has_journal"), "{args}");
        assert!(args.contains("-d /t /i.ext4"), "{args}");
    }
}
