//! A PNG thumbnail: the event is a PNG image; the result is a PNG at most
//! 128×128, aspect kept (the `image` crate: decode, shrink with its
//! area-averaging `thumbnail`, encode).

use std::io::Cursor;

use image::{ImageFormat, ImageReader};

/// The thumbnail's bound.
pub const SIDE: u32 = 128;

/// Makes the thumbnail of the PNG `event`.
pub fn handle(event: &[u8]) -> Result<Vec<u8>, String> {
    let image = ImageReader::with_format(Cursor::new(event), ImageFormat::Png)
        .decode()
        .map_err(|e| format!("the event is not a PNG image: {e}"))?;
    let thumb = image.thumbnail(SIDE, SIDE);
    let mut out = Cursor::new(Vec::new());
    thumb
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("cannot encode the thumbnail: {e}"))?;
    Ok(out.into_inner())
}

/// The benchmark's event: a 1024×768 RGB PNG of gradients and rings.
pub fn sample_event() -> Vec<u8> {
    let img = image::RgbImage::from_fn(1024, 768, |x, y| {
        let (dx, dy) = (x as i64 - 512, y as i64 - 384);
        let ring = ((dx * dx + dy * dy) as f64).sqrt() as u32 % 64 * 4;
        image::Rgb([(x / 4) as u8, (y / 3) as u8, ring as u8])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).expect("encodes");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    #[test]
    fn thumbnail_is_a_small_png() {
        let out = super::handle(&super::sample_event()).unwrap();
        let img = image::load_from_memory_with_format(&out, image::ImageFormat::Png).unwrap();
        assert_eq!((img.width(), img.height()), (128, 96));
        assert!(super::handle(b"not a png").is_err());
    }
}
