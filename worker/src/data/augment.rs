//! Joint augmentation: one random geometry (horizontal flip, scale, crop or pad to a square
//! `image_size`) applied to the image (bilinear), its boxes and its mask (nearest neighbour,
//! padding = 255 ignore), then colour jitter on the image alone.
//!
//! The arithmetic is in f32 on values in [0, 1]; the result is quantised once, at the end, to
//! u8 ([`quantise`]): batches travel as u8 and are normalised on the device
//! (`data::batch::network_images`). That rounding (at most half a grey level) is the only
//! difference from keeping the f32 values.
//!
//! The randomness of a sample is keyed only by (seed, epoch, sample id), so the same sample
//! is augmented identically whichever rank or thread loads it. Evaluation mode letterboxes
//! (scale the longer side to `image_size`, centre, pad) with no randomness.
use image::RgbImage;
use mtl_job::{AugmentSection, DataSection};

use super::batch::{GtBox, IGNORE_INDEX, IMAGENET_MEAN};
use super::rng::Rng;
use super::sample::BoxLabel;

/// How samples are transformed into network inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentConfig {
    /// Side of the square output in pixels.
    pub image_size: u32,
    /// Random augmentation (training) or deterministic letterbox (evaluation).
    pub random: bool,
    /// Flip probability, scale range and colour jitter (`[data.augment]`).
    pub params: AugmentSection,
}

impl AugmentConfig {
    /// Training augmentation from `[data]` and `[data.augment]`.
    pub fn train(data: &DataSection) -> Self {
        Self { image_size: data.image_size, random: true, params: data.augment.clone() }
    }

    /// Deterministic letterbox to `image_size` for evaluation.
    pub fn eval(image_size: u32) -> Self {
        let params = AugmentSection {
            hflip_prob: 0.0,
            scale_min: 1.0,
            scale_max: 1.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
        };
        Self { image_size, random: false, params }
    }
}

/// One transformed sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Augmented {
    /// `3 × S × S` u8 RGB, channel-major ([`quantise`]d); padding is [`PAD_RGB`], the ImageNet
    /// mean (about 0 once normalised).
    pub image: Vec<u8>,
    /// Boxes in output pixels, clipped; those left under 1 px wide or high are dropped.
    pub boxes: Vec<GtBox>,
    /// `S × S` class ids (row-major), 255 in padding; `None` when the input had no mask.
    pub mask: Option<Vec<u8>>,
}

/// The evaluation letterbox of a `width × height` image into a square of `size` pixels
/// (network = original · k + (tx, ty)), and its inverse, with which predictions are mapped back
/// to the original image by both `worker predict` and evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Letterbox {
    /// Scale: the longer side becomes `size`.
    pub(crate) k: f64,
    /// Horizontal offset of the image in the square.
    pub(crate) tx: f64,
    /// Vertical offset of the image in the square.
    pub(crate) ty: f64,
    width: u32,
    height: u32,
}

impl Letterbox {
    /// The letterbox [`AugmentConfig::eval`] applies to a `width × height` image.
    pub(crate) fn new(size: u32, width: u32, height: u32) -> Self {
        let k = f64::from(size) / f64::from(width.max(height));
        let centre = |extent: u32| (f64::from(size) - f64::from(extent) * k) / 2.0;
        Self { k, tx: centre(width), ty: centre(height), width, height }
    }

    /// A box `[x1, y1, x2, y2]` in network pixels as `[x1, y1, x2, y2]` in the original image,
    /// clipped to it; `None` when nothing of it is inside.
    pub(crate) fn original_box(&self, b: [f32; 4]) -> Option<[f64; 4]> {
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        let x = |v: f32| ((f64::from(v) - self.tx) / self.k).clamp(0.0, w);
        let y = |v: f32| ((f64::from(v) - self.ty) / self.k).clamp(0.0, h);
        let out = [x(b[0]), y(b[1]), x(b[2]), y(b[3])];
        (out[2] > out[0] && out[3] > out[1]).then_some(out)
    }
}

/// Where the source image lands in the output: `u = x' * k + tx` with `x' = W - x` if flipped.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    flip: bool,
    k: f64,
    tx: f64,
    ty: f64,
}

struct Jitter {
    brightness: f32,
    contrast: f32,
    saturation: f32,
}

fn draw(cfg: &AugmentConfig, w: u32, h: u32, rng: &mut Rng) -> (Geometry, Jitter) {
    let size = f64::from(cfg.image_size);
    let base = size / f64::from(w.max(h));
    // Every draw happens in a fixed order whatever the config, so streams stay aligned.
    let p = &cfg.params;
    let flip = rng.chance(p.hflip_prob);
    let k = base * rng.range(p.scale_min, p.scale_max);
    let (u_x, u_y) = (rng.unit(), rng.unit());
    let mut factor = |amount: f64| rng.range(1.0 - amount, 1.0 + amount) as f32;
    let jitter = Jitter {
        brightness: factor(p.brightness),
        contrast: factor(p.contrast),
        saturation: factor(p.saturation),
    };
    // Slack >= 0 pads (offset in [0, slack]); slack < 0 crops (offset in [slack, 0]).
    let place = |extent: f64, u: f64| {
        let slack = size - extent;
        if cfg.random {
            u * slack
        } else {
            slack / 2.0
        }
    };
    let geometry = Geometry { flip, k, tx: place(f64::from(w) * k, u_x), ty: place(f64::from(h) * k, u_y) };
    (geometry, jitter)
}

/// Per output column (or row): the source sample position, if inside the image.
struct Tap {
    nearest: usize,
    lo: usize,
    hi: usize,
    frac: f32,
}

fn taps(out: u32, src: u32, k: f64, t: f64, flip: bool) -> Vec<Option<Tap>> {
    (0..out)
        .map(|u| {
            let mut x = (f64::from(u) + 0.5 - t) / k;
            if flip {
                x = f64::from(src) - x;
            }
            if !(0.0..f64::from(src)).contains(&x) {
                return None;
            }
            let c = (x - 0.5).clamp(0.0, f64::from(src - 1));
            let lo = c.floor() as usize;
            Some(Tap {
                nearest: x.floor() as usize,
                lo,
                hi: (lo + 1).min(src as usize - 1),
                frac: (c - lo as f64) as f32,
            })
        })
        .collect()
}

/// The u8 value of padding pixels: the ImageNet mean, which normalisation maps to within
/// 0.01 of 0 (the f32 pipeline padded with exactly 0).
pub(crate) const PAD_RGB: [u8; 3] = [
    (IMAGENET_MEAN[0] * 255.0 + 0.5) as u8,
    (IMAGENET_MEAN[1] * 255.0 + 0.5) as u8,
    (IMAGENET_MEAN[2] * 255.0 + 0.5) as u8,
];

/// The one point where an augmented pixel value in [0, 1] (bilinear interpolation and colour
/// jitter are computed in f32) becomes the u8 that the batch carries: the nearest grey level.
/// A value that was a grey level already (`q / 255`, no interpolation) comes back as `q`.
pub(crate) fn quantise(value: f32) -> u8 {
    (value * 255.0).round().clamp(0.0, 255.0) as u8
}

/// Transforms one sample. `mask` (row-major, the image's size) and `boxes` are optional.
pub(crate) fn augment(
    image: &RgbImage,
    boxes: &[BoxLabel],
    mask: Option<&[u8]>,
    cfg: &AugmentConfig,
    key: [u64; 3],
) -> Augmented {
    let (w, h) = image.dimensions();
    let s = cfg.image_size as usize;
    let mut rng = Rng::from_key(&key);
    let (g, jitter) = draw(cfg, w, h, &mut rng);
    let cols = taps(cfg.image_size, w, g.k, g.tx, g.flip);
    let rows = taps(cfg.image_size, h, g.k, g.ty, false);

    // Geometry: bilinear RGB in [0, 1], NaN marks padding.
    let raw = image.as_raw();
    let px = |x: usize, y: usize, c: usize| f32::from(raw[(y * w as usize + x) * 3 + c]) / 255.0;
    let mut rgb = vec![f32::NAN; s * s * 3];
    for (v, row) in rows.iter().enumerate() {
        let Some(ry) = row else { continue };
        for (u, col) in cols.iter().enumerate() {
            let Some(cx) = col else { continue };
            for c in 0..3 {
                let top = px(cx.lo, ry.lo, c) * (1.0 - cx.frac) + px(cx.hi, ry.lo, c) * cx.frac;
                let bottom = px(cx.lo, ry.hi, c) * (1.0 - cx.frac) + px(cx.hi, ry.hi, c) * cx.frac;
                rgb[(v * s + u) * 3 + c] = top * (1.0 - ry.frac) + bottom * ry.frac;
            }
        }
    }
    if cfg.random {
        colour_jitter(&mut rgb, &jitter);
    }
    let mut out = vec![0u8; 3 * s * s];
    for p in 0..s * s {
        for c in 0..3 {
            let value = rgb[p * 3 + c];
            out[c * s * s + p] = if value.is_nan() { PAD_RGB[c] } else { quantise(value) };
        }
    }

    let mask = mask.map(|m| {
        let mut target = vec![IGNORE_INDEX; s * s];
        for (v, row) in rows.iter().enumerate() {
            let Some(ry) = row else { continue };
            for (u, col) in cols.iter().enumerate() {
                if let Some(cx) = col {
                    target[v * s + u] = m[ry.nearest * w as usize + cx.nearest];
                }
            }
        }
        target
    });

    let size = s as f32;
    let boxes = boxes
        .iter()
        .filter_map(|b| {
            let (mut x1, mut x2) = (b.x, b.x + b.w);
            if g.flip {
                (x1, x2) = (f64::from(w) - x2, f64::from(w) - x1);
            }
            let map = |x: f64, t: f64| ((x * g.k + t) as f32).clamp(0.0, size);
            let gt = GtBox {
                x1: map(x1, g.tx),
                x2: map(x2, g.tx),
                y1: map(b.y, g.ty),
                y2: map(b.y + b.h, g.ty),
                category: b.category,
                iscrowd: b.iscrowd,
            };
            (gt.x2 - gt.x1 >= 1.0 && gt.y2 - gt.y1 >= 1.0).then_some(gt)
        })
        .collect();
    Augmented { image: out, boxes, mask }
}

/// Brightness, then contrast (around the mean grey), then saturation (around each pixel's
/// grey), over the non-padding pixels, clamped to [0, 1].
fn colour_jitter(rgb: &mut [f32], j: &Jitter) {
    let grey = |p: &[f32]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let (mut sum, mut n) = (0.0f64, 0usize);
    for p in rgb.chunks_exact_mut(3).filter(|p| !p[0].is_nan()) {
        for v in p.iter_mut() {
            *v = (*v * j.brightness).clamp(0.0, 1.0);
        }
        sum += f64::from(grey(p));
        n += 1;
    }
    let mean = if n > 0 { (sum / n as f64) as f32 } else { 0.0 };
    for p in rgb.chunks_exact_mut(3).filter(|p| !p[0].is_nan()) {
        for v in p.iter_mut() {
            *v = ((*v - mean) * j.contrast + mean).clamp(0.0, 1.0);
        }
        let g = grey(p);
        for v in p.iter_mut() {
            *v = ((*v - g) * j.saturation + g).clamp(0.0, 1.0);
        }
    }
}

#[cfg(test)]
mod tests;
