//! `worker predict`: runs a checkpoint on images and writes what people and other tools use,
//! all in the input images' own coordinates and sizes:
//! - `detections.json`: COCO results (`image_id`, `category_id`, `bbox` [x,y,w,h], `score`),
//!   scoreable with `worker eval --gt` or pycocotools. Given a COCO instances file (or a JSONL
//!   manifest) as input, the image ids are the file's and the category ids the checkpoint's
//!   (the training data's), so `predict` then `eval --gt` on the same file is a round trip;
//! - `classes.json`: per image, the class and its probability (or every class's probability
//!   for multi-label models);
//! - `masks/<name>.png`: the predicted class id of every pixel (8-bit grey);
//! - `overlays/<name>.png`: the input with the mask tinted and the boxes drawn, to look at.
use std::fs;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::data::augment::{augment, AugmentConfig, Letterbox};
use crate::data::batch::{host_tensor, network_images};
use crate::data::{coco, jsonl, DatasetInfo};
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

/// The images to predict.
#[derive(Debug, PartialEq)]
struct Inputs {
    /// (image id, path), in the order they are predicted.
    images: Vec<(u64, PathBuf)>,
    /// A COCO file's category ids, ascending.
    coco_categories: Option<Vec<u64>>,
}

/// The inputs:
/// - a directory: its PNG/JPEG files in file-name order, numbered from 0;
/// - a `.json` file: a COCO instances file's images with their ids (paths under `image_root`,
///   by default the file's directory), in id order;
/// - any other file: a JSONL manifest's images with their ids, in id order.
fn list_inputs(input: &Path, image_root: Option<&Path>) -> Result<Inputs, WorkerError> {
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
        let images = files.into_iter().enumerate().map(|(i, p)| (i as u64, p)).collect();
        return Ok(Inputs { images, coco_categories: None });
    }
    let coco = input.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let dataset = if coco {
        let root = image_root.unwrap_or_else(|| input.parent().unwrap_or(Path::new("")));
        coco::read_coco(input, root, mtl_job::ClassRule::LargestArea)?
    } else {
        jsonl::read_manifest(input)?
    };
    let coco_categories = coco.then(|| dataset.info.det_categories.iter().map(|(id, _)| *id).collect());
    let mut images: Vec<(u64, PathBuf)> = dataset.samples.into_iter().map(|s| (s.id, s.image)).collect();
    images.sort_by_key(|(id, _)| *id);
    Ok(Inputs { images, coco_categories })
}

/// Predicts every input with the checkpoint `checkpoint_dir` (or the newest complete one in it)
/// and writes the files into `out`. `input` is a directory of PNG/JPEG files (ids in file-name order from 0), a COCO instances
/// file (`.json`; images under `image_root`, by default its directory) or a JSONL manifest
/// (any other file); the images of a file are predicted with their ids, in id order.
/// Overlays draw only boxes scoring at least `overlay_score`; `detections.json` has them all.
/// `on_progress` counts input images (skipped ones included).
// One parameter per flag of `worker predict`, passed straight through.
#[allow(clippy::too_many_arguments)]
pub fn run(
    checkpoint_dir: &Path,
    input: &Path,
    image_root: Option<&Path>,
    out: &Path,
    device: tch::Device,
    batch_size: usize,
    overlay_score: f64,
    on_progress: crate::OnProgress<'_>,
) -> Result<PredictSummary, WorkerError> {
    let loaded = checkpoint::open(checkpoint_dir)?;
    // Under the generator's lock (see `with_seed`): the checkpoint's values replace the initial ones.
    let mut model = crate::model::with_seed(0, || {
        MultiTaskModel::new(&loaded.cfg.model, &loaded.cfg.tasks, &loaded.info, device)
    })?;
    loaded.load_model(&mut model)?;
    let size = loaded.cfg.data.image_size;
    let Inputs { images: inputs, coco_categories } = list_inputs(input, image_root)?;
    let ours: Vec<u64> = loaded.info.det_categories.iter().map(|(id, _)| *id).collect();
    if coco_categories.is_some_and(|theirs| theirs != ours) {
        tracing::warn!(
            input = %input.display(),
            "the input's category ids differ from the checkpoint's {ours:?}; detections carry the checkpoint's"
        );
    }
    for sub in ["masks", "overlays"] {
        let dir = out.join(sub);
        fs::create_dir_all(&dir).map_err(|source| WorkerError::Io { path: dir, source })?;
    }
    let mut summary = PredictSummary { images: 0, skipped: 0, detections: 0 };
    let (mut detections, mut classes) = (Vec::new(), Vec::new());
    let (total, mut done) = (inputs.len() as u64, 0);
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
            done += chunk.len() as u64;
            on_progress(done, total);
            continue;
        }
        let s = i64::from(size);
        let batch = network_images(&host_tensor(&pixels, &[images.len() as i64, 3, s, s])?, device)?;
        for ((id, path, img), pred) in images.iter().zip(predict(&model, &batch)?) {
            let name = path.file_stem().map_or_else(|| id.to_string(), |s| s.to_string_lossy().into_owned());
            let (w, h) = img.dimensions();
            let lb = Letterbox::new(size, w, h);
            let boxes = original_boxes(&pred, &lb);
            for (b, score, category) in &boxes {
                detections.push(serde_json::json!({
                    "image_id": id,
                    "category_id": loaded.info.det_categories[*category as usize].0,
                    "bbox": coco_bbox(b),
                    "score": score,
                }));
            }
            summary.detections += boxes.len();
            if let Some(c) = &pred.class {
                classes.push(class_json(*id, path, c, &loaded.info));
            }
            let mask = pred.mask.as_ref().map(|m| original_mask(m, size, &lb, w, h));
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
        done += chunk.len() as u64;
        on_progress(done, total);
    }
    for (file, value) in [("detections.json", detections), ("classes.json", classes)] {
        let p = out.join(file);
        let text = serde_json::to_string_pretty(&serde_json::Value::Array(value)).expect("json");
        fs::write(&p, text).map_err(|source| WorkerError::Io { path: p, source })?;
    }
    Ok(summary)
}

/// Detections mapped back to the original image through the inverse of the evaluation
/// letterbox: ([x1, y1, x2, y2], score, category), clipped to the image, empty boxes dropped.
/// Evaluation maps its predictions with this same function, so its statistics are those of
/// `detections.json`.
pub(crate) fn original_boxes(pred: &Prediction, lb: &Letterbox) -> Vec<([f64; 4], f64, u32)> {
    pred.detections
        .iter()
        .filter_map(|d| {
            lb.original_box([d.x1, d.y1, d.x2, d.y2]).map(|b| (b, f64::from(d.score), d.category))
        })
        .collect()
}

/// COCO's `[x, y, w, h]` of a corner box.
pub(crate) fn coco_bbox(b: &[f64; 4]) -> [f64; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// The network-resolution mask resampled (nearest) to the original image.
fn original_mask(mask: &[u8], size: u32, lb: &Letterbox, w: u32, h: u32) -> image::GrayImage {
    let s = size as usize;
    let at = |v: u32, t: f64| (((f64::from(v) + 0.5) * lb.k + t).floor().max(0.0) as usize).min(s - 1);
    image::GrayImage::from_fn(w, h, |u, v| image::Luma([mask[at(v, lb.ty) * s + at(u, lb.tx)]]))
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
        let lb = Letterbox::new(64, 100, 50);
        assert_eq!((lb.k, lb.tx, lb.ty), (0.64, 0.0, 16.0));
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
        let boxes = original_boxes(&pred, &lb);
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
    fn files_keep_their_image_ids() {
        let dir = tempfile::tempdir().unwrap();
        let coco = dir.path().join("instances.json");
        let doc = serde_json::json!({
            "images": [
                {"id": 42, "file_name": "b.png", "width": 4, "height": 4},
                {"id": 7, "file_name": "a.png", "width": 4, "height": 4}
            ],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": []
        });
        fs::write(&coco, doc.to_string()).unwrap();
        let inputs = list_inputs(&coco, None).unwrap();
        assert_eq!(inputs.images, [(7, dir.path().join("a.png")), (42, dir.path().join("b.png"))]);
        assert_eq!(inputs.coco_categories, Some(vec![3]));
        let inputs = list_inputs(&coco, Some(Path::new("/data/val2017"))).unwrap();
        assert_eq!(inputs.images[0].1, Path::new("/data/val2017/a.png"), "--image-root");
        let manifest = dir.path().join("m.jsonl");
        fs::write(&manifest, "{\"file\": \"x.png\", \"id\": 9}\n{\"file\": \"y.png\", \"id\": 2}\n").unwrap();
        let inputs = list_inputs(&manifest, None).unwrap();
        assert_eq!(inputs.images, [(2, dir.path().join("y.png")), (9, dir.path().join("x.png"))]);
        assert_eq!(inputs.coco_categories, None);
    }

    #[test]
    fn mask_is_resampled_to_the_original_size() {
        // Network mask: left half class 1, right half class 2, for a 4x2 image in a 4 px square.
        let mask: Vec<u8> = (0..16).map(|i| if i % 4 < 2 { 1 } else { 2 }).collect();
        let m = original_mask(&mask, 4, &Letterbox::new(4, 4, 2), 4, 2);
        assert_eq!(m.dimensions(), (4, 2));
        assert_eq!(m.get_pixel(0, 0)[0], 1);
        assert_eq!(m.get_pixel(3, 1)[0], 2);
    }
}
