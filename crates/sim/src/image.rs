//! The pictures the simulated nodes pass along, and the real PNG files SaveImage writes.

use std::path::Path;

/// A solid-colour picture: enough to write a real PNG and to check that ImageInvert ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: [u8; 3],
}

impl Picture {
    /// EmptyImage's `color` is 0xRRGGBB.
    pub fn from_color(width: u32, height: u32, color: u64) -> Picture {
        Picture {
            width,
            height,
            rgb: [(color >> 16) as u8, (color >> 8) as u8, color as u8],
        }
    }

    pub fn inverted(self) -> Picture {
        Picture {
            rgb: self.rgb.map(|c| 255 - c),
            ..self
        }
    }

    /// Encodes the picture as an 8-bit RGB PNG.
    pub fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width.max(1), self.height.max(1));
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header()?;
            let n = self.width.max(1) as usize * self.height.max(1) as usize;
            let data: Vec<u8> = self.rgb.iter().copied().cycle().take(n * 3).collect();
            writer.write_image_data(&data)?;
        }
        Ok(out)
    }

    /// The size and first pixel of a PNG file, as LoadImage would see it; `None` for
    /// anything the decoder does not take.
    pub fn from_png(bytes: &[u8]) -> Option<Picture> {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().ok()?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).ok()?;
        let px = &buf[..info.line_size.min(buf.len())];
        let rgb = match (info.color_type, px) {
            (png::ColorType::Rgb | png::ColorType::Rgba, [r, g, b, ..]) => [*r, *g, *b],
            (png::ColorType::Grayscale | png::ColorType::GrayscaleAlpha, [v, ..]) => [*v; 3],
            _ => [128; 3],
        };
        Some(Picture {
            width: info.width,
            height: info.height,
            rgb,
        })
    }

    /// A small JPEG-like preview payload (the bytes of a tiny PNG; clients only forward them).
    pub fn preview(&self) -> Vec<u8> {
        Picture {
            width: 8,
            height: 8,
            rgb: self.rgb,
        }
        .png()
        .unwrap_or_default()
    }
}

/// The next free `{prefix}_{counter:05}_.{ext}` in `dir`, as ComfyUI's get_save_image_path
/// counts: one more than the highest counter already there for that prefix.
pub fn next_file_name(dir: &Path, prefix: &str, ext: &str) -> String {
    let mut max = 0u64;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
                continue;
            };
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<u64>() {
                max = max.max(n);
            }
        }
    }
    format!("{prefix}_{:05}_.{ext}", max + 1)
}
