//! Pictures: a small preview made when a photo is sent (it rides in the message, so a
//! photo shows at once), and drawn in the terminal with half blocks: each cell shows
//! two pixels, the upper as the `▀`'s colour and the lower as its background.

use std::io::Cursor;
use std::path::Path;

use image::{ImageReader, Limits, RgbImage};
use kkachi_protocol::file::MAX_THUMBNAIL_BYTES;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};

/// The longer side of a preview, in pixels.
pub const PREVIEW_SIDE: u32 = 96;
/// Pictures larger than this get no preview.
pub const MAX_PREVIEWED_BYTES: u64 = 64 << 20;
/// The largest preview from a contact that is drawn, in pixels on each side (ours are
/// at most [`PREVIEW_SIDE`]).
pub const MAX_DRAWN_SIDE: u32 = 128;

/// A preview of the picture at `path` (PNG or JPEG, by `mime`): at most
/// [`PREVIEW_SIDE`] pixels on its longer side, as a JPEG within the bound a file
/// reference allows. `None` for anything else, or a picture that does not decode.
pub fn preview(path: &Path, mime: &str) -> Option<Vec<u8>> {
    if !matches!(mime, "image/png" | "image/jpeg") {
        return None;
    }
    // The user's own file, but still bounded: a decoder may read all of it first, and
    // a picture that claims to be vast is not worth a preview.
    if std::fs::metadata(path).ok()?.len() > MAX_PREVIEWED_BYTES {
        return None;
    }
    let mut reader = ImageReader::open(path).ok()?.with_guessed_format().ok()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(12_000);
    limits.max_image_height = Some(12_000);
    limits.max_alloc = Some(128 << 20);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().ok()?;
    // As a phone's camera meant it: upright.
    let orientation = image::ImageDecoder::orientation(&mut decoder).ok();
    let mut full = image::DynamicImage::from_decoder(decoder).ok()?;
    if let Some(o) = orientation {
        full.apply_orientation(o);
    }
    let small = full.thumbnail(PREVIEW_SIDE, PREVIEW_SIDE);
    let rgb = small.to_rgb8();
    for quality in [80u8, 65, 50, 35, 20] {
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        if rgb.write_with_encoder(encoder).is_ok() && out.len() <= MAX_THUMBNAIL_BYTES {
            return Some(out);
        }
    }
    None
}

/// The pixels of a preview a contact sent, decoded under tight bounds (it is theirs:
/// a few kilobytes may claim any size). `None` if it does not decode within them.
pub fn pixels(preview: &[u8]) -> Option<RgbImage> {
    if preview.is_empty() || preview.len() > MAX_THUMBNAIL_BYTES {
        return None;
    }
    let mut reader = ImageReader::new(Cursor::new(preview))
        .with_guessed_format()
        .ok()?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_DRAWN_SIDE);
    limits.max_image_height = Some(MAX_DRAWN_SIDE);
    limits.max_alloc = Some(1 << 20);
    reader.limits(limits);
    Some(reader.decode().ok()?.to_rgb8())
}

/// `picture` scaled to fit `cols` columns and `rows` rows of half blocks, keeping its
/// shape (a cell is about twice as tall as wide, and holds two pixels one above the
/// other).
pub fn fit(picture: &RgbImage, cols: u16, rows: u16) -> Option<RgbImage> {
    let (w, h) = picture.dimensions();
    if w == 0 || h == 0 || cols == 0 || rows == 0 {
        return None;
    }
    let scale = (f64::from(cols) / f64::from(w)).min(f64::from(rows) * 2.0 / f64::from(h));
    let tw = ((f64::from(w) * scale).round() as u32).clamp(1, u32::from(cols));
    let th = ((f64::from(h) * scale).round() as u32).clamp(1, u32::from(rows) * 2);
    if (tw, th) == (w, h) {
        return Some(picture.clone());
    }
    Some(image::imageops::resize(
        picture,
        tw,
        th,
        image::imageops::FilterType::Triangle,
    ))
}

/// Lines drawing `picture` within `cols` columns and `rows` rows (see [`fit`]).
pub fn half_blocks(picture: &RgbImage, cols: u16, rows: u16) -> Vec<Line<'static>> {
    let Some(small) = fit(picture, cols, rows) else {
        return Vec::new();
    };
    let (tw, th) = small.dimensions();
    let color = |x: u32, y: u32| {
        let p = small.get_pixel(x, y).0;
        Color::Rgb(p[0], p[1], p[2])
    };
    (0..th)
        .step_by(2)
        .map(|y| {
            let spans: Vec<Span<'static>> = (0..tw)
                .map(|x| {
                    let mut style = Style::new().fg(color(x, y));
                    if y + 1 < th {
                        style = style.bg(color(x, y + 1));
                    }
                    Span::styled("▀", style)
                })
                .collect();
            Line::from(spans)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
        })
    }

    #[test]
    fn a_preview_is_small_and_keeps_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        gradient(1200, 600).save(&path).unwrap();
        let preview = preview(&path, "image/png").expect("a preview");
        assert!(preview.len() <= MAX_THUMBNAIL_BYTES, "{}", preview.len());
        let back = pixels(&preview).expect("it decodes");
        assert_eq!(back.dimensions(), (PREVIEW_SIDE, PREVIEW_SIDE / 2));
        // Not a picture: no preview.
        std::fs::write(dir.path().join("x.png"), b"not a picture").unwrap();
        assert!(preview_of(&dir.path().join("x.png")).is_none());
    }

    fn preview_of(path: &Path) -> Option<Vec<u8>> {
        preview(path, "image/png")
    }

    #[test]
    fn a_preview_claiming_to_be_vast_is_not_decoded() {
        let png = |side: u32| {
            let mut out = Vec::new();
            RgbImage::new(side, side)
                .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
                .unwrap();
            out
        };
        // A few kilobytes that would take 2 MB decoded: refused, and so is anything
        // larger than a preview is drawn.
        let vast = png(800);
        assert!(vast.len() <= MAX_THUMBNAIL_BYTES, "{}", vast.len());
        assert!(pixels(&vast).is_none());
        assert!(pixels(&png(MAX_DRAWN_SIDE + 1)).is_none());
        // Within the bounds: drawn.
        assert!(pixels(&png(MAX_DRAWN_SIDE)).is_some());
        assert!(pixels(b"\xff\xd8\xff junk").is_none());
        assert!(pixels(&[]).is_none());
    }

    #[test]
    fn half_blocks_fit_the_room_given_and_keep_the_shape() {
        let wide = gradient(96, 48);
        let lines = half_blocks(&wide, 20, 8);
        // 20 columns by 10 pixels: 5 rows of cells.
        assert_eq!(lines.len(), 5);
        assert!(lines.iter().all(|l| l.spans.len() == 20));
        let tall = gradient(48, 96);
        let lines = half_blocks(&tall, 20, 8);
        assert_eq!(lines.len(), 8);
        assert!(lines.iter().all(|l| l.spans.len() == 8));
        assert!(half_blocks(&wide, 0, 8).is_empty());
    }
}
