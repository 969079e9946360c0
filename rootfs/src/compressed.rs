//! Compressed kernel module files. Debian's 6.12 kernels ship every module as `.ko.xz`;
//! kernels may also use `.ko.zst` or `.ko.gz`. The image builder reads a module's
//! `.modinfo` through the compression and puts the module into images decompressed (as
//! `.ko`), so any kernel loads it, whether or not it was built to decompress modules itself.

use std::io::Read;
use std::path::Path;

/// Largest module a decompression may produce (the biggest Debian modules are a few MiB).
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// A module file's compression, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    /// The name without `.ko` and its compression suffix, and the compression (`None` for a
    /// plain `.ko`); `None` altogether when the name is not a module's.
    pub fn split(file_name: &str) -> Option<(&str, Option<Self>)> {
        if let Some(stem) = file_name.strip_suffix(".ko") {
            return Some((stem, None));
        }
        for (suffix, c) in [
            (".ko.xz", Self::Xz),
            (".ko.zst", Self::Zstd),
            (".ko.gz", Self::Gzip),
        ] {
            if let Some(stem) = file_name.strip_suffix(suffix) {
                return Some((stem, Some(c)));
            }
        }
        None
    }

    /// The compression of the file at `path`, by its name.
    pub fn of(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_string_lossy();
        Self::split(&name).and_then(|(_, c)| c)
    }
}

/// A module that could not be decompressed.
#[derive(Debug, thiserror::Error)]
#[error("{compression:?}: {reason}")]
pub struct DecompressError {
    pub compression: Compression,
    pub reason: String,
}

/// Decompresses one module image.
pub fn decompress(data: &[u8], compression: Compression) -> Result<Vec<u8>, DecompressError> {
    let err = |reason: String| DecompressError {
        compression,
        reason,
    };
    let mut out = Vec::with_capacity(data.len() * 4);
    match compression {
        Compression::Xz => {
            let mut input = std::io::BufReader::new(data);
            let mut limited = LimitedWriter {
                out: &mut out,
                left: MAX_MODULE_BYTES,
            };
            lzma_rs::xz_decompress(&mut input, &mut limited).map_err(|e| err(e.to_string()))?;
        }
        Compression::Zstd => {
            let dec =
                ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| err(e.to_string()))?;
            read_bounded(dec, &mut out).map_err(|e| err(e.to_string()))?;
        }
        Compression::Gzip => {
            read_bounded(flate2::read::GzDecoder::new(data), &mut out)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(out)
}

fn too_large() -> std::io::Error {
    std::io::Error::other(format!(
        "decompresses to more than {MAX_MODULE_BYTES} bytes"
    ))
}

fn read_bounded(r: impl Read, out: &mut Vec<u8>) -> std::io::Result<()> {
    let n = r.take(MAX_MODULE_BYTES + 1).read_to_end(out)?;
    if n as u64 > MAX_MODULE_BYTES {
        return Err(too_large());
    }
    Ok(())
}

/// A writer that refuses to grow past a bound.
struct LimitedWriter<'a> {
    out: &'a mut Vec<u8>,
    left: u64,
}

impl std::io::Write for LimitedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(too_large());
        }
        self.left -= buf.len() as u64;
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A module file's contents, decompressed when its name says it is compressed.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ReadError> {
    let data = std::fs::read(path).map_err(ReadError::Io)?;
    match Compression::of(path) {
        None => Ok(data),
        Some(c) => decompress(&data, c).map_err(ReadError::Decompress),
    }
}

/// Why [`read_module`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    Decompress(DecompressError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Something shaped like a module: an ELF magic and a `.modinfo`-like string table.
    fn sample() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        for i in 0..2000u32 {
            v.extend_from_slice(format!("depends=a{},b\0", i % 7).as_bytes());
        }
        v
    }

    #[test]
    fn names_say_the_compression() {
        assert_eq!(Compression::split("kvm.ko"), Some(("kvm", None)));
        assert_eq!(
            Compression::split("kvm-amd.ko.xz"),
            Some(("kvm-amd", Some(Compression::Xz)))
        );
        assert_eq!(
            Compression::split("vfio.ko.zst"),
            Some(("vfio", Some(Compression::Zstd)))
        );
        assert_eq!(
            Compression::split("evdev.ko.gz"),
            Some(("evdev", Some(Compression::Gzip)))
        );
        assert_eq!(Compression::split("modules.dep"), None);
        assert_eq!(Compression::split("x.ko.bz2"), None);
    }

    #[test]
    fn each_format_round_trips() {
        let data = sample();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&data[..]), &mut xz).unwrap();
        assert_eq!(decompress(&xz, Compression::Xz).unwrap(), data);
        let zst = ruzstd::encoding::compress_to_vec(
            &data[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(decompress(&zst, Compression::Zstd).unwrap(), data);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress(&gz, Compression::Gzip).unwrap(), data);
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let data = sample();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&data[..]), &mut xz).unwrap();
        for c in [Compression::Xz, Compression::Zstd, Compression::Gzip] {
            assert!(decompress(b"not compressed at all", c).is_err(), "{c:?}");
            assert!(decompress(&[], c).is_err(), "{c:?}");
        }
        assert!(decompress(&xz[..xz.len() / 2], Compression::Xz).is_err());
    }

    #[test]
    fn a_file_is_read_through_its_compression() {
        let dir = tempfile::tempdir().unwrap();
        let data = sample();
        let plain = dir.path().join("m.ko");
        std::fs::write(&plain, &data).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let packed = dir.path().join("m.ko.gz");
        std::fs::write(&packed, gz.finish().unwrap()).unwrap();
        assert_eq!(read_module(&plain).unwrap(), data);
        assert_eq!(read_module(&packed).unwrap(), data);
    }
}
