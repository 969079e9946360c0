//! The build machine's side of screenshots: the emulated host's second serial port (a file
//! here) carries the GUI VM's frames (`bulkhead_desktop::frame`); each picture is decoded
//! with the `png` crate (bounded, safe Rust: the bytes come from a VM) and written as
//! `<name>.png` with weston's scene next to it as `<name>.scene.txt`.

use std::path::{Path, PathBuf};

use bulkhead_desktop::frame::{self, Kind};
use bulkhead_desktop::scene::Scene;

/// Largest picture accepted (a GUI VM's output is far smaller).
pub const MAX_SIDE: u32 = 8192;

#[derive(Debug, thiserror::Error)]
pub enum ScreensError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the screenshot stream: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("picture {name}: {reason}")]
    Png { name: String, reason: String },
}

/// A decoded picture: RGBA8, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
}

impl Image {
    /// The pixel at (x, y) as [r, g, b, a]; None outside.
    pub fn pixel(&self, x: i64, y: i64) -> Option<[u8; 4]> {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return None;
        }
        let i = ((y as usize) * (self.width as usize) + x as usize) * 4;
        let p = self.rgba.get(i..i + 4)?;
        Some([p[0], p[1], p[2], p[3]])
    }

    /// How many pixels are not black (RGB); a picture of no pixels counts as one lit
    /// pixel, so "nothing lit" is never said of an empty picture.
    pub fn lit_pixels(&self) -> usize {
        if self.width == 0 || self.height == 0 {
            return 1;
        }
        self.rgba
            .chunks(4)
            .filter(|p| p.get(..3) != Some(&[0, 0, 0][..]))
            .count()
    }
}

/// Decodes a PNG (any bit depth and colour type the crate expands to 8-bit RGB(A) or grey)
/// into RGBA8, refusing pictures larger than [`MAX_SIDE`].
pub fn decode_png(name: &str, bytes: &[u8]) -> Result<Image, ScreensError> {
    let err = |reason: String| ScreensError::Png {
        name: name.to_string(),
        reason,
    };
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    dec.set_limits(png::Limits {
        bytes: (MAX_SIDE as usize) * (MAX_SIDE as usize) * 4,
    });
    let mut reader = dec.read_info().map_err(|e| err(e.to_string()))?;
    let (w, h) = {
        let info = reader.info();
        (info.width, info.height)
    };
    if w == 0 || h == 0 || w > MAX_SIDE || h > MAX_SIDE {
        return Err(err(format!("{w}x{h}")));
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let out = reader
        .next_frame(&mut buf)
        .map_err(|e| err(e.to_string()))?;
    let data = buf.get(..out.buffer_size()).unwrap_or_default();
    let px = (w as usize) * (h as usize);
    let rgba: Vec<u8> = match out.color_type {
        png::ColorType::Rgba => data.to_vec(),
        png::ColorType::Rgb => data
            .chunks_exact(3)
            .flat_map(|c| [c[0], c[1], c[2], 255])
            .collect(),
        png::ColorType::GrayscaleAlpha => data
            .chunks_exact(2)
            .flat_map(|c| [c[0], c[0], c[0], c[1]])
            .collect(),
        png::ColorType::Grayscale => data.iter().flat_map(|g| [*g, *g, *g, 255]).collect(),
        png::ColorType::Indexed => return Err(err("an indexed picture after expansion".into())),
    };
    if rgba.len() != px * 4 {
        return Err(err(format!("{} bytes for {w}x{h}", rgba.len())));
    }
    Ok(Image {
        width: w,
        height: h,
        rgba,
    })
}

/// One picture from the stream.
#[derive(Debug, Clone)]
pub struct Picture {
    pub name: String,
    pub png: PathBuf,
    pub image: Image,
    /// Weston's scene at that moment (the text, parsed).
    pub scene_text: String,
    pub scene: Scene,
}

/// Reads the frames in `stream` and writes each picture to `out_dir`; later pictures of
/// the same name replace earlier ones. A stream cut inside a frame (the machine died) keeps
/// the pictures before the cut.
pub fn extract(stream: &Path, out_dir: &Path) -> Result<Vec<Picture>, ScreensError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScreensError::Io { path, source }
    };
    let bytes = match std::fs::read(stream) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(stream)(e)),
    };
    let mut dec = frame::Decoder::new();
    let frames = dec.feed(&bytes)?;
    if let Err(e) = dec.finish() {
        log::warn!("the screenshot stream: {e} (pictures before it are kept)");
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut scenes: Vec<(String, String)> = Vec::new();
    let mut out: Vec<Picture> = Vec::new();
    for f in frames {
        match f.kind {
            Kind::Scene => {
                let text = String::from_utf8_lossy(&f.body).into_owned();
                scenes.retain(|(n, _)| *n != f.name);
                scenes.push((f.name, text));
            }
            Kind::Note => log::info!("{}: {}", f.name, String::from_utf8_lossy(&f.body)),
            Kind::Png => {
                let image = decode_png(&f.name, &f.body)?;
                let png = out_dir.join(format!("{}.png", f.name));
                std::fs::write(&png, &f.body).map_err(io(&png))?;
                let scene_text = scenes
                    .iter()
                    .find(|(n, _)| *n == f.name)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default();
                let txt = out_dir.join(format!("{}.scene.txt", f.name));
                std::fs::write(&txt, &scene_text).map_err(io(&txt))?;
                out.retain(|p| p.name != f.name);
                out.push(Picture {
                    scene: Scene::parse(&scene_text),
                    name: f.name,
                    png,
                    image,
                    scene_text,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_desktop::frame::Frame;

    fn png_of(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut e = png::Encoder::new(&mut out, w, h);
            e.set_color(png::ColorType::Rgba);
            e.set_depth(png::BitDepth::Eight);
            let mut wr = e.write_header().unwrap();
            let data: Vec<u8> = (0..w * h)
                .flat_map(|_| [rgb[0], rgb[1], rgb[2], 255])
                .collect();
            wr.write_image_data(&data).unwrap();
        }
        out
    }

    #[test]
    fn pictures_come_out_of_the_stream_with_their_scene() {
        let dir = tempfile::tempdir().unwrap();
        let stream = dir.path().join("screens.bin");
        let mut bytes = Vec::new();
        bytes.extend(
            Frame::new(
                Kind::Scene,
                "desktop",
                b"Layer 5 (pos 0x50000000):\n".to_vec(),
            )
            .unwrap()
            .encode(),
        );
        bytes.extend(
            Frame::new(Kind::Png, "desktop", png_of(4, 3, [1, 2, 3]))
                .unwrap()
                .encode(),
        );
        // A cut frame at the end (the machine died mid-picture) loses only that one.
        bytes.extend_from_slice(b"BHSHOT1 png later 100\nabc");
        std::fs::write(&stream, &bytes).unwrap();
        let pics = extract(&stream, &dir.path().join("out")).unwrap();
        assert_eq!(pics.len(), 1);
        let p = &pics[0];
        assert_eq!((p.image.width, p.image.height), (4, 3));
        assert_eq!(p.image.pixel(3, 2), Some([1, 2, 3, 255]));
        assert_eq!(p.image.pixel(4, 0), None);
        assert!(p.png.ends_with("out/desktop.png"));
        assert!(p.scene_text.starts_with("Layer 5"));
        assert!(dir.path().join("out/desktop.scene.txt").exists());
        assert!(extract(&dir.path().join("none"), dir.path())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_broken_png_is_an_error_naming_the_picture() {
        let e = decode_png("desktop", b"\x89PNG\r\n\x1a\nnot really").unwrap_err();
        assert!(e.to_string().starts_with("picture desktop: "), "{e}");
    }
}
