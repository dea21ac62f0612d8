//! Joint augmentation: one random geometry (horizontal flip, scale, crop or pad to a square
//! `image_size`) applied to the image (bilinear), its boxes and its mask (nearest neighbour,
//! padding = 255 ignore), then colour jitter on the image alone: here, or, for training on a
//! GPU (`AugmentConfig::jitter_on_device`), drawn here and applied on the device to the whole
//! batch (`data::batch::ColourJitter`), so that the loader threads do no per-pixel colour work.
//!
//! The arithmetic is in f32 on values in [0, 1]; the result is quantised once, at the end, to
//! u8 ([`quantise`]): batches travel as u8 and are normalised on the device
//! (`data::batch::network_images`). That rounding (at most half a grey level) is the only
//! difference from keeping the f32 values; jitter on the device comes after it.
//!
//! The randomness of a sample is keyed only by (seed, epoch, sample id), so the same sample
//! is augmented identically whichever rank or thread loads it. Evaluation mode letterboxes
//! (scale the longer side to `image_size`, centre, pad) with no randomness.
use image::RgbImage;
use mtl_job::{AugmentSection, DataSection};

use super::batch::{GtBox, GREY, IGNORE_INDEX, IMAGENET_MEAN};
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
    /// Leave the colour jitter to the device: the sample carries it ([`Augmented::jitter`])
    /// and `Batch::to_device` applies it to the whole batch. Set for training on a GPU: on a
    /// CPU those batched ops cost the step more than the per-pixel loop costs a loader thread
    /// (docs/PERFORMANCE.md).
    pub jitter_on_device: bool,
}

impl AugmentConfig {
    /// Training augmentation from `[data]` and `[data.augment]`.
    pub fn train(data: &DataSection) -> Self {
        Self {
            image_size: data.image_size,
            random: true,
            params: data.augment.clone(),
            jitter_on_device: false,
        }
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
        Self { image_size, random: false, params, jitter_on_device: false }
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
    /// The sample's colour jitter, for the device to apply (`jitter_on_device`); `None` when
    /// it was applied here or there is none (evaluation, or every factor 1).
    pub jitter: Option<Jitter>,
}

/// A sample's colour jitter ([`colour_jitter`]'s arithmetic): brightness, then contrast around
/// the mean grey of the pixels inside the source image, then saturation around each pixel's
/// grey, each clamped to the range of values; applied on the device
/// (`data::batch::ColourJitter`) to those pixels only (the rest is padding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Jitter {
    /// Brightness, contrast and saturation factors.
    pub factors: [f32; 3],
    /// Rows `y0..y1` and columns `x0..x1` of the output pixels inside the source image:
    /// `[y0, y1, x0, x1]`.
    pub inside: [i64; 4],
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

/// The geometry and the jitter factors (brightness, contrast, saturation) of one sample.
fn draw(cfg: &AugmentConfig, w: u32, h: u32, rng: &mut Rng) -> (Geometry, [f32; 3]) {
    let size = f64::from(cfg.image_size);
    let base = size / f64::from(w.max(h));
    // Every draw happens in a fixed order whatever the config, so streams stay aligned.
    let p = &cfg.params;
    let flip = rng.chance(p.hflip_prob);
    let k = base * rng.range(p.scale_min, p.scale_max);
    let (u_x, u_y) = (rng.unit(), rng.unit());
    let mut factor = |amount: f64| rng.range(1.0 - amount, 1.0 + amount) as f32;
    let jitter = [factor(p.brightness), factor(p.contrast), factor(p.saturation)];
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
    // For the values in [0, 255] left after the clamp, adding 0.5 and truncating is rounding
    // half up, without the library call `round` is on baseline x86-64 (a third of the loader's
    // time went there).
    ((value * 255.0).clamp(0.0, 255.0) + 0.5) as u8
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

    // Geometry: bilinear RGB in [0, 1] for the pixels inside the source image (the rows and
    // columns whose taps are `Some`), one plane per channel, row-major; every other pixel is
    // padding. Planes keep the per-pixel arithmetic below free of strides (vectorised).
    let raw = image.as_raw();
    let inside = |taps: &[Option<Tap>]| -> Vec<(usize, [usize; 2], f32)> {
        taps.iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (i, [t.lo * 3, t.hi * 3], t.frac)))
            .collect()
    };
    let (in_rows, in_cols) = (inside(&rows), inside(&cols));
    let n = in_rows.len() * in_cols.len();
    let mut planes: [Vec<f32>; 3] = std::array::from_fn(|_| Vec::with_capacity(n));
    let row_bytes = w as usize * 3;
    for &(_, [y_lo, y_hi], fy) in &in_rows {
        let (top, bottom) =
            (&raw[y_lo / 3 * row_bytes..][..row_bytes], &raw[y_hi / 3 * row_bytes..][..row_bytes]);
        for (c, plane) in planes.iter_mut().enumerate() {
            plane.extend(in_cols.iter().map(|&(_, [x_lo, x_hi], fx)| {
                let px = |line: &[u8], x: usize| f32::from(line[x + c]) / 255.0;
                let t = px(top, x_lo) * (1.0 - fx) + px(top, x_hi) * fx;
                let b = px(bottom, x_lo) * (1.0 - fx) + px(bottom, x_hi) * fx;
                t * (1.0 - fy) + b * fy
            }));
        }
    }
    let jitter = match (cfg.random && jitter != [1.0; 3], cfg.jitter_on_device) {
        (false, _) => None,
        (true, false) => {
            colour_jitter(&mut planes, jitter);
            None
        }
        (true, true) => {
            let span = |taps: &[(usize, [usize; 2], f32)]| {
                taps.first().zip(taps.last()).map_or([0, 0], |(a, b)| [a.0 as i64, b.0 as i64 + 1])
            };
            let ([y0, y1], [x0, x1]) = (span(&in_rows), span(&in_cols));
            Some(Jitter { factors: jitter, inside: [y0, y1, x0, x1] })
        }
    };
    let mut out = vec![0u8; 3 * s * s];
    for ((c, plane), values) in out.chunks_exact_mut(s * s).enumerate().zip(&planes) {
        plane.fill(PAD_RGB[c]);
        let mut values = values.iter();
        for &(v, ..) in &in_rows {
            let line = &mut plane[v * s..][..s];
            for (&(u, ..), &value) in in_cols.iter().zip(values.by_ref()) {
                line[u] = quantise(value);
            }
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
    Augmented { image: out, boxes, mask, jitter }
}

/// Brightness, then contrast (around the mean grey), then saturation (around each pixel's
/// grey), by `factors` in that order, over the non-padding pixels (`[r, g, b]` planes),
/// clamped to [0, 1].
fn colour_jitter([r, g, b]: &mut [Vec<f32>; 3], [brightness, contrast, saturation]: [f32; 3]) {
    let grey = |r: f32, g: f32, b: f32| GREY[0] * r + GREY[1] * g + GREY[2] * b;
    for plane in [&mut *r, &mut *g, &mut *b] {
        for v in plane.iter_mut() {
            *v = (*v * brightness).clamp(0.0, 1.0);
        }
    }
    // Summed pixel by pixel in f64, in row-major order.
    let sum: f64 = r.iter().zip(g.iter()).zip(b.iter()).map(|((&r, &g), &b)| f64::from(grey(r, g, b))).sum();
    let mean = if r.is_empty() { 0.0 } else { (sum / r.len() as f64) as f32 };
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let contrasted = |v: f32| ((v - mean) * contrast + mean).clamp(0.0, 1.0);
        (*r, *g, *b) = (contrasted(*r), contrasted(*g), contrasted(*b));
        let grey = grey(*r, *g, *b);
        let saturated = |v: f32| ((v - grey) * saturation + grey).clamp(0.0, 1.0);
        (*r, *g, *b) = (saturated(*r), saturated(*g), saturated(*b));
    }
}

#[cfg(test)]
mod tests;
