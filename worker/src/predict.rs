//! `worker predict`: runs a checkpoint on images and writes what people and other tools use,
//! all in the input images' own coordinates and sizes:
//! - `detections.json`: COCO results (`image_id`, `category_id`, `bbox` [x,y,w,h], `score`),
//!   scoreable with `worker eval --gt` or pycocotools;
//! - `classes.json`: per image, the class and its probability (or every class's probability
//!   for multi-label models);
//! - `masks/<name>.png`: the predicted class id of every pixel (8-bit grey);
//! - `overlays/<name>.png`: the input with the mask tinted and the boxes drawn, to look at.
use std::fs;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use tch::Tensor;

use crate::data::augment::{augment, AugmentConfig};
use crate::data::{jsonl, DatasetInfo};
use crate::model::{predict, MultiTaskModel, Prediction};
use crate::tasks::classification::ClassPrediction;
use crate::train::checkpoint;
use crate::WorkerError;

/// What a prediction run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictSummary {
    /// Images predicted.
    pub images: usize,
    /// Images that could not be read (logged with their path).
    pub skipped: usize,
    /// Detections written.
    pub detections: usize,
}

/// The inputs: every PNG/JPEG of a directory (ids in file-name order) or a JSONL manifest's images.
pub fn list_inputs(input: &Path) -> Result<Vec<(u64, PathBuf)>, WorkerError> {
    if input.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(input)
            .map_err(|source| WorkerError::Io { path: input.to_owned(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
            })
            .collect();
        files.sort();
        Ok(files.into_iter().enumerate().map(|(i, p)| (i as u64, p)).collect())
    } else {
        Ok(jsonl::read_manifest(input)?.samples.into_iter().map(|s| (s.id, s.image)).collect())
    }
}

/// The letterbox the evaluation transform applies: network = original * k + (tx, ty).
fn letterbox(size: u32, w: u32, h: u32) -> (f64, f64, f64) {
    let k = f64::from(size) / f64::from(w.max(h));
    (k, (f64::from(size) - f64::from(w) * k) / 2.0, (f64::from(size) - f64::from(h) * k) / 2.0)
}

/// Predicts every input with the checkpoint in `checkpoint_dir` and writes the files into `out`.
/// Overlays draw only boxes scoring at least `overlay_score`; `detections.json` has them all.
pub fn run(
    checkpoint_dir: &Path,
    input: &Path,
    out: &Path,
    device: tch::Device,
    batch_size: usize,
    overlay_score: f64,
) -> Result<PredictSummary, WorkerError> {
    let loaded = checkpoint::open(checkpoint_dir)?;
    let mut model = MultiTaskModel::new(&loaded.cfg.model, &loaded.cfg.tasks, &loaded.info, device)?;
    checkpoint::load_into(&mut model, &loaded.weights)?;
    let size = loaded.cfg.data.image_size;
    let inputs = list_inputs(input)?;
    for sub in ["masks", "overlays"] {
        let dir = out.join(sub);
        fs::create_dir_all(&dir).map_err(|source| WorkerError::Io { path: dir, source })?;
    }
    let mut summary = PredictSummary { images: 0, skipped: 0, detections: 0 };
    let (mut detections, mut classes) = (Vec::new(), Vec::new());
    for chunk in inputs.chunks(batch_size.max(1)) {
        let mut images = Vec::new();
        let mut pixels = Vec::new();
        for (id, path) in chunk {
            match image::open(path) {
                Ok(img) => {
                    let img = img.to_rgb8();
                    pixels.extend(augment(&img, &[], None, &AugmentConfig::eval(size), [0, 0, *id]).image);
                    images.push((*id, path, img));
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "skipped an unreadable image");
                    summary.skipped += 1;
                }
            }
        }
        if images.is_empty() {
            continue;
        }
        let s = i64::from(size);
        let batch =
            Tensor::f_from_slice(&pixels)?.f_view([images.len() as i64, 3, s, s])?.f_to_device(device)?;
        for ((id, path, img), pred) in images.iter().zip(predict(&model, &batch)?) {
            let name = path.file_stem().map_or_else(|| id.to_string(), |s| s.to_string_lossy().into_owned());
            let (w, h) = img.dimensions();
            let (k, tx, ty) = letterbox(size, w, h);
            let boxes = original_boxes(&pred, k, tx, ty, w, h);
            for (b, score, category) in &boxes {
                detections.push(serde_json::json!({
                    "image_id": id,
                    "category_id": loaded.info.det_categories[*category as usize].0,
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                    "score": score,
                }));
            }
            summary.detections += boxes.len();
            if let Some(c) = &pred.class {
                classes.push(class_json(*id, path, c, &loaded.info));
            }
            let mask = pred.mask.as_ref().map(|m| original_mask(m, size, k, tx, ty, w, h));
            if let Some(mask) = &mask {
                let p = out.join("masks").join(format!("{name}.png"));
                mask.save(&p)
                    .map_err(|e| WorkerError::Io { path: p.clone(), source: std::io::Error::other(e) })?;
            }
            let p = out.join("overlays").join(format!("{name}.png"));
            let shown: Vec<_> = boxes.iter().filter(|b| b.1 >= overlay_score).copied().collect();
            overlay(img, mask.as_ref(), &shown)
                .save(&p)
                .map_err(|e| WorkerError::Io { path: p.clone(), source: std::io::Error::other(e) })?;
            summary.images += 1;
        }
    }
    for (file, value) in [("detections.json", detections), ("classes.json", classes)] {
        let p = out.join(file);
        let text = serde_json::to_string_pretty(&serde_json::Value::Array(value)).expect("json");
        fs::write(&p, text).map_err(|source| WorkerError::Io { path: p, source })?;
    }
    Ok(summary)
}

/// Detections mapped back to the original image: ([x1,y1,x2,y2], score, category).
fn original_boxes(pred: &Prediction, k: f64, tx: f64, ty: f64, w: u32, h: u32) -> Vec<([f64; 4], f64, u32)> {
    let (w, h) = (f64::from(w), f64::from(h));
    pred.detections
        .iter()
        .map(|d| {
            let x = |v: f32| ((f64::from(v) - tx) / k).clamp(0.0, w);
            let y = |v: f32| ((f64::from(v) - ty) / k).clamp(0.0, h);
            ([x(d.x1), y(d.y1), x(d.x2), y(d.y2)], f64::from(d.score), d.category)
        })
        .filter(|(b, _, _)| b[2] > b[0] && b[3] > b[1])
        .collect()
}

/// The network-resolution mask resampled (nearest) to the original image.
fn original_mask(mask: &[u8], size: u32, k: f64, tx: f64, ty: f64, w: u32, h: u32) -> image::GrayImage {
    let s = size as usize;
    let at = |v: u32, t: f64| (((f64::from(v) + 0.5) * k + t).floor().max(0.0) as usize).min(s - 1);
    image::GrayImage::from_fn(w, h, |u, v| image::Luma([mask[at(v, ty) * s + at(u, tx)]]))
}

fn class_json(id: u64, path: &Path, c: &ClassPrediction, info: &DatasetInfo) -> serde_json::Value {
    let file = path.display().to_string();
    match c {
        ClassPrediction::Single { index, score } => serde_json::json!({
            "image_id": id, "file": file, "class": info.class_names.get(*index), "index": index, "score": score,
        }),
        ClassPrediction::Multi(scores) => {
            let scores: serde_json::Map<String, serde_json::Value> =
                info.class_names.iter().zip(scores).map(|(n, s)| (n.clone(), serde_json::json!(s))).collect();
            serde_json::json!({ "image_id": id, "file": file, "scores": scores })
        }
    }
}

/// A distinct, saturated colour per class or category.
fn colour(i: u32) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 8] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
    ];
    Rgb(PALETTE[i as usize % PALETTE.len()])
}

/// The input with non-background mask pixels tinted and 2-px box outlines.
fn overlay(img: &RgbImage, mask: Option<&image::GrayImage>, boxes: &[([f64; 4], f64, u32)]) -> RgbImage {
    let mut out = img.clone();
    if let Some(mask) = mask {
        for (x, y, p) in out.enumerate_pixels_mut() {
            let class = mask.get_pixel(x, y)[0];
            if class != 0 && class != 255 {
                let c = colour(u32::from(class) + 3);
                for ch in 0..3 {
                    p[ch] = ((u16::from(p[ch]) + u16::from(c[ch])) / 2) as u8;
                }
            }
        }
    }
    let (w, h) = out.dimensions();
    for (b, _, category) in boxes {
        let c = colour(*category);
        let (x1, y1) = (b[0] as u32, b[1] as u32);
        let (x2, y2) = ((b[2] as u32).min(w - 1), (b[3] as u32).min(h - 1));
        for t in 0..2u32 {
            for x in x1..=x2 {
                for y in [y1 + t, y2.saturating_sub(t)] {
                    if y < h {
                        out.put_pixel(x, y, c);
                    }
                }
            }
            for y in y1..=y2 {
                for x in [x1 + t, x2.saturating_sub(t)] {
                    if x < w {
                        out.put_pixel(x, y, c);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letterbox_maps_network_coordinates_back_to_the_original() {
        // A 100x50 image in a 64 px square: scaled by 0.64, centred vertically.
        let (k, tx, ty) = letterbox(64, 100, 50);
        assert_eq!((k, tx, ty), (0.64, 0.0, 16.0));
        let pred = Prediction {
            class: None,
            detections: vec![crate::tasks::decode::Detection {
                x1: 6.4,
                y1: 16.0,
                x2: 64.0,
                y2: 48.0,
                score: 0.5,
                category: 1,
            }],
            mask: None,
        };
        let boxes = original_boxes(&pred, k, tx, ty, 100, 50);
        let b = boxes[0].0;
        assert!(
            (b[0] - 10.0).abs() < 1e-4
                && b[1].abs() < 1e-9
                && (b[2] - 100.0).abs() < 1e-9
                && (b[3] - 50.0).abs() < 1e-9,
            "{b:?}"
        );
    }

    #[test]
    fn mask_is_resampled_to_the_original_size() {
        // Network mask: left half class 1, right half class 2, for a 4x2 image in a 4 px square.
        let mask: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 1 } else { 2 }).collect();
        let (k, tx, ty) = letterbox(4, 4, 2);
        let m = original_mask(&mask, 4, k, tx, ty, 4, 2);
        assert_eq!(m.dimensions(), (4, 2));
        assert_eq!(m.get_pixel(0, 0)[0], 1);
        assert_eq!(m.get_pixel(3, 1)[0], 2);
    }
}
