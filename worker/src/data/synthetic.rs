//! The built-in synthetic dataset: shapes (circle, square, triangle, cross, ring) in random
//! colours on textured backgrounds (noise, stripes, gradients, checks), 1-3 shapes per image:
//! a large one (radius 18-32% of the image) and up to two smaller ones (8-22%) drawn over it,
//! rotated and overlapping. The `easy` preset draws 1-2 shapes, a larger one (24-36%) and at
//! most one small distractor (8-14%), on plain or gradient backgrounds. Every task is labelled:
//!
//! - class: the shape class with the largest visible area (summed over its shapes); scenes are
//!   redrawn until that area is at least [`CLASS_MARGIN`] times the runner-up's, so the class
//!   is never a near tie;
//! - boxes: the bounding box of the visible pixels of each shape with at least
//!   [`MIN_VISIBLE_PX`] visible pixels (category = shape class);
//! - mask: visible pixels of each shape = class + 1, background 0, the pixels of shapes too
//!   occluded to get a box = 255 (ignore).
//!
//! Colours are drawn independently of the shape class, so only the shape tells classes apart.
//! Generation is a pure function of (preset, seed, sample index): the same seed gives the same
//! bytes. `ensure` generates a dataset once, safely when several processes ask at once.
use std::fmt::Write as _;
use std::path::Path;

use image::{GrayImage, RgbImage};
pub use mtl_job::SyntheticPreset;

use super::batch::{DatasetInfo, IGNORE_INDEX};
use super::jsonl::write_info;
use super::rng::Rng;
use crate::{OnProgress, WorkerError};

mod ensure;
pub(crate) use ensure::ensure;

/// The shape classes, in class-index order.
pub(crate) const SHAPES: [&str; 5] = ["circle", "square", "triangle", "cross", "ring"];

/// A shape with fewer visible pixels gets no box and is ignored in the mask.
pub(crate) const MIN_VISIBLE_PX: usize = 12;

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Images in all (train + val).
    pub n: u32,
    /// Side of the square images in pixels.
    pub size: u32,
    /// Seed; the same seed gives the same files.
    pub seed: u64,
    /// Fraction of the images (the last ones) written to `val.jsonl`.
    pub val_fraction: f64,
    /// Which scenes to draw.
    pub preset: SyntheticPreset,
}

/// The label spaces of the synthetic dataset.
pub(crate) fn info() -> DatasetInfo {
    let names: Vec<String> = SHAPES.iter().map(|s| s.to_string()).collect();
    let mut seg_classes = vec!["background".to_string()];
    seg_classes.extend(names.iter().cloned());
    DatasetInfo {
        class_names: names.clone(),
        multi_label: false,
        det_categories: names.into_iter().enumerate().map(|(i, n)| (i as u64, n)).collect(),
        seg_classes,
    }
}

/// One rendered image with its labels.
struct Scene {
    image: RgbImage,
    mask: GrayImage,
    /// (x, y, w, h, class) of each visible shape.
    boxes: Vec<[u32; 5]>,
    /// None only if no shape is visible enough (possible for tiny images).
    class: Option<u32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |source| WorkerError::Io { path: path.to_owned(), source }
}

/// Writes `images/`, `masks/`, `train.jsonl`, `val.jsonl` and, last, `dataset.json` into `dir`
/// (a directory with `dataset.json` is complete).
pub(crate) fn generate(dir: &Path, cfg: &SyntheticConfig) -> Result<(), WorkerError> {
    generate_with(dir, cfg, &mut |_, _| {})
}

/// [`generate`], telling `on_progress` (images written, images in all) after each image.
pub fn generate_with(
    dir: &Path,
    cfg: &SyntheticConfig,
    on_progress: OnProgress<'_>,
) -> Result<(), WorkerError> {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
    }
    let n_val = (f64::from(cfg.n) * cfg.val_fraction).round() as u32;
    let (mut train, mut val) = (String::new(), String::new());
    for i in 0..cfg.n {
        let scene = render(cfg.size, Scenes::of(cfg.preset), &mut Rng::from_key(&[cfg.seed, u64::from(i)]));
        let (image, mask) = (format!("images/{i:06}.png"), format!("masks/{i:06}.png"));
        scene
            .image
            .save(dir.join(&image))
            .map_err(|source| WorkerError::ImageWrite { path: dir.join(&image), source })?;
        scene
            .mask
            .save(dir.join(&mask))
            .map_err(|source| WorkerError::ImageWrite { path: dir.join(&mask), source })?;
        let boxes: Vec<String> =
            scene.boxes.iter().map(|b| format!("[{},{},{},{},{}]", b[0], b[1], b[2], b[3], b[4])).collect();
        let out = if i >= cfg.n - n_val { &mut val } else { &mut train };
        let class = scene.class.map(|c| format!(r#","class":{c}"#)).unwrap_or_default();
        let _ = writeln!(
            out,
            r#"{{"id":{i},"file":"{image}"{class},"boxes":[{}],"mask":"{mask}"}}"#,
            boxes.join(",")
        );
        on_progress(u64::from(i) + 1, u64::from(cfg.n));
    }
    for (name, text) in [("train.jsonl", train), ("val.jsonl", val)] {
        std::fs::write(dir.join(name), text).map_err(io(&dir.join(name)))?;
    }
    // Last: its presence marks the directory complete.
    write_info(dir, &info())?;
    Ok(())
}

/// The ranges a preset draws scenes from.
#[derive(Debug, Clone, Copy)]
struct Scenes {
    /// 1 to this many shapes.
    max_shapes: u64,
    /// Radius of the first (largest) shape, as a fraction of the image side.
    large: (f64, f64),
    /// Radius of the shapes drawn over it.
    small: (f64, f64),
    /// Background kinds to choose from: 0 noise, 1 stripes, 2 gradient, 3 checks.
    backgrounds: &'static [u64],
}

impl Scenes {
    fn of(preset: SyntheticPreset) -> Self {
        match preset {
            SyntheticPreset::Standard => {
                Self { max_shapes: 3, large: (0.18, 0.32), small: (0.08, 0.22), backgrounds: &[0, 1, 2, 3] }
            }
            SyntheticPreset::Easy => {
                Self { max_shapes: 2, large: (0.24, 0.36), small: (0.08, 0.14), backgrounds: &[0, 2] }
            }
        }
    }
}

const PALETTE: [[f64; 3]; 8] = [
    [230.0, 40.0, 40.0],
    [40.0, 200.0, 60.0],
    [50.0, 80.0, 230.0],
    [240.0, 220.0, 50.0],
    [230.0, 60.0, 220.0],
    [40.0, 220.0, 220.0],
    [245.0, 245.0, 245.0],
    [20.0, 20.0, 20.0],
];

fn rand_colour(rng: &mut Rng, lo: f64, hi: f64) -> [f64; 3] {
    [rng.range(lo, hi), rng.range(lo, hi), rng.range(lo, hi)]
}

/// The background texture's colour at (x, y), before noise.
fn background(size: u32, kinds: &[u64], rng: &mut Rng) -> Vec<[f64; 3]> {
    let (c1, c2) = (rand_colour(rng, 30.0, 200.0), rand_colour(rng, 30.0, 200.0));
    let kind = kinds[rng.below(kinds.len() as u64) as usize];
    let angle = rng.range(0.0, std::f64::consts::PI);
    let period = rng.range(3.0, f64::from(size) / 4.0);
    let (ca, sa) = (angle.cos(), angle.sin());
    let s = f64::from(size);
    let mut out = Vec::with_capacity((size * size) as usize);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (f64::from(x), f64::from(y));
            let t = (fx * ca + fy * sa) / period;
            let c = match kind {
                0 => c1,
                1 if t.floor().rem_euclid(2.0) == 0.0 => c1,
                1 => c2,
                2 => {
                    let a = ((fx * ca + fy * sa) / (s * 1.5) + 0.5).clamp(0.0, 1.0);
                    std::array::from_fn(|i| c1[i] * (1.0 - a) + c2[i] * a)
                }
                _ if ((fx / period).floor() + (fy / period).floor()).rem_euclid(2.0) == 0.0 => c1,
                _ => c2,
            };
            out.push(c);
        }
    }
    let amount = if kind == 0 { 40.0 } else { 15.0 };
    for p in &mut out {
        for v in p.iter_mut() {
            *v += rng.range(-amount, amount);
        }
    }
    out
}

/// Is the point (x, y), in shape-local units (radius 1, unrotated), inside shape `class`?
fn inside(class: u32, x: f64, y: f64) -> bool {
    let d2 = x * x + y * y;
    match class {
        0 => d2 <= 1.0,
        1 => x.abs().max(y.abs()) <= 0.75,
        2 => [-90f64, 30.0, 150.0].iter().all(|a| {
            let a = a.to_radians();
            x * a.cos() + y * a.sin() <= 0.5
        }),
        3 => (x.abs() <= 0.3 && y.abs() <= 1.0) || (y.abs() <= 0.3 && x.abs() <= 1.0),
        _ => (0.3025..=1.0).contains(&d2),
    }
}

/// Renders scenes until the class is clear: the largest visible class area at least
/// [`CLASS_MARGIN`] times the second (after 20 tries the last scene is kept).
fn render(size: u32, scenes: Scenes, rng: &mut Rng) -> Scene {
    let mut tries = 0;
    loop {
        let (scene, area) = render_once(size, scenes, rng);
        let mut sorted = area;
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        tries += 1;
        if sorted[0] as f64 >= CLASS_MARGIN * sorted[1] as f64 || tries == 20 {
            return scene;
        }
    }
}

/// The largest visible class area is at least this many times the second largest.
pub(crate) const CLASS_MARGIN: f64 = 1.5;

fn render_once(size: u32, scenes: Scenes, rng: &mut Rng) -> (Scene, [usize; SHAPES.len()]) {
    let n = size as usize;
    let mut rgb = background(size, scenes.backgrounds, rng);
    let bg_mean: [f64; 3] = std::array::from_fn(|i| rgb.iter().map(|p| p[i]).sum::<f64>() / rgb.len() as f64);
    let mut owner: Vec<Option<usize>> = vec![None; n * n];
    let count = 1 + rng.below(scenes.max_shapes) as usize;
    let mut classes = Vec::with_capacity(count);
    for shape in 0..count {
        let class = rng.below(SHAPES.len() as u64) as u32;
        // The first shape is large, the others (drawn over it) are smaller distractors.
        let (lo, hi) = if shape == 0 { scenes.large } else { scenes.small };
        let r = f64::from(size) * rng.range(lo, hi);
        let (cx, cy) =
            (rng.range(r * 0.6, f64::from(size) - r * 0.6), rng.range(r * 0.6, f64::from(size) - r * 0.6));
        let angle = rng.range(0.0, std::f64::consts::TAU);
        let mut colour = [0.0; 3];
        for _ in 0..10 {
            let base = PALETTE[rng.below(PALETTE.len() as u64) as usize];
            colour = std::array::from_fn(|i| base[i] + rng.range(-25.0, 25.0));
            let dist: f64 = (0..3).map(|i| (colour[i] - bg_mean[i]).powi(2)).sum::<f64>().sqrt();
            if dist > 90.0 {
                break;
            }
        }
        let (ca, sa) = (angle.cos(), angle.sin());
        let lo = |c: f64| (c - r).floor().max(0.0) as usize;
        let hi = |c: f64| ((c + r).ceil() as usize).min(n - 1);
        for y in lo(cy)..=hi(cy) {
            for x in lo(cx)..=hi(cx) {
                let (dx, dy) = ((x as f64 + 0.5 - cx) / r, (y as f64 + 0.5 - cy) / r);
                if inside(class, dx * ca + dy * sa, -dx * sa + dy * ca) {
                    owner[y * n + x] = Some(shape);
                    rgb[y * n + x] = std::array::from_fn(|i| colour[i] + rng.range(-10.0, 10.0));
                }
            }
        }
        classes.push(class);
    }

    let mut extent = vec![(usize::MAX, usize::MAX, 0usize, 0usize, 0usize); count];
    for (p, o) in owner.iter().enumerate() {
        if let Some(s) = *o {
            let (x, y) = (p % n, p / n);
            let e = &mut extent[s];
            *e = (e.0.min(x), e.1.min(y), e.2.max(x), e.3.max(y), e.4 + 1);
        }
    }
    let visible: Vec<bool> = extent.iter().map(|e| e.4 >= MIN_VISIBLE_PX).collect();
    let mut area = [0usize; SHAPES.len()];
    let mut boxes = Vec::new();
    for (s, e) in extent.iter().enumerate().filter(|(s, _)| visible[*s]) {
        area[classes[s] as usize] += e.4;
        boxes.push([e.0 as u32, e.1 as u32, (e.2 + 1 - e.0) as u32, (e.3 + 1 - e.1) as u32, classes[s]]);
    }
    let class = (0..SHAPES.len()).rev().max_by_key(|&c| area[c]).filter(|&c| area[c] > 0).map(|c| c as u32);
    let mask_px: Vec<u8> = owner
        .iter()
        .map(|o| match *o {
            None => 0,
            Some(s) if visible[s] => classes[s] as u8 + 1,
            Some(_) => IGNORE_INDEX,
        })
        .collect();
    let pixels: Vec<u8> = rgb
        .iter()
        .flat_map(|p| p.map(|v| (v + rng.range(-6.0, 6.0)).round().clamp(0.0, 255.0) as u8))
        .collect();
    let scene = Scene {
        image: RgbImage::from_raw(size, size, pixels).expect("size matches"),
        mask: GrayImage::from_raw(size, size, mask_px).expect("size matches"),
        boxes,
        class,
    };
    (scene, area)
}

#[cfg(test)]
mod tests;
