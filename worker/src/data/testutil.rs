//! Helpers shared by the data tests: tiny images and manifests in a temporary directory.
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};

/// Writes a `w × h` RGB PNG whose pixels depend on `tone`, returns its path.
pub(crate) fn png(dir: &Path, name: &str, w: u32, h: u32, tone: u8) -> PathBuf {
    let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([tone, (x * 7) as u8, (y * 11) as u8]));
    let path = dir.join(name);
    img.save(&path).unwrap();
    path
}

/// Writes a `w × h` greyscale mask PNG, `value` inside the rectangle `x0..x1 × y0..y1`.
pub(crate) fn mask_png(dir: &Path, name: &str, (w, h): (u32, u32), rect: [u32; 4], value: u8) -> PathBuf {
    let [x0, y0, x1, y1] = rect;
    let m = GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if (x0..x1).contains(&x) && (y0..y1).contains(&y) { value } else { 0 }])
    });
    let path = dir.join(name);
    m.save(&path).unwrap();
    path
}

/// Writes a text file, returns its path.
pub(crate) fn text(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}
