//! COCO files: the instances reader ([`instances`], shared with the worker) and loading COCO
//! ground truth and bbox results into [`DetectionStats`].
//!
//! Mirrors what pycocotools does with `COCO(gt)` and `COCO.loadRes(results)` for
//! bbox results: the evaluated categories are the ground truth's `categories`,
//! the images are its `images`, a detection's area is `w * h`, and the order of
//! annotations and results within an image is kept (it breaks score ties).
//!
//! The ground truth follows the reader's rules (see [`instances`]). Results whose
//! `image_id` is not in the ground truth are an error naming the file and entry
//! (pycocotools asserts); an empty results list is accepted (pycocotools crashes
//! on it) and means "no detections".

pub mod instances;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

pub use instances::{parse_instances, read_json, CocoAnnotation, CocoCategory, CocoImage, CocoInstances};

use crate::detection::{Detection, DetectionStats, ImageRecord};
use crate::MetricsError;

/// Reads a COCO ground-truth file and a COCO results file into detection statistics.
pub fn load_detection_stats(
    ground_truth: impl AsRef<Path>,
    results: impl AsRef<Path>,
) -> Result<DetectionStats, MetricsError> {
    let (gt_path, res_path) = (ground_truth.as_ref(), results.as_ref());
    parse_detection_stats(&read_json(gt_path)?, gt_path, &read_json(res_path)?, res_path)
}

/// Reads a COCO ground-truth file into detection statistics without detections.
pub fn load_ground_truth(ground_truth: impl AsRef<Path>) -> Result<DetectionStats, MetricsError> {
    let path = ground_truth.as_ref();
    let (categories, images) = parse_ground_truth(&read_json(path)?, path)?;
    build(categories, images)
}

/// Like [`load_detection_stats`] on already parsed JSON; `gt_name` and
/// `results_name` are only used in error messages.
pub fn parse_detection_stats(
    ground_truth: &Value,
    gt_name: &Path,
    results: &Value,
    results_name: &Path,
) -> Result<DetectionStats, MetricsError> {
    let (categories, mut images) = parse_ground_truth(ground_truth, gt_name)?;
    let ctx = Ctx { path: results_name };
    let list = results.as_array().ok_or_else(|| ctx.err("<root>", "expected an array of results"))?;
    for (i, item) in list.iter().enumerate() {
        let field = |name: &str| format!("[{i}].{name}");
        let obj = item.as_object().ok_or_else(|| ctx.err(&format!("[{i}]"), "expected an object"))?;
        let image_id = ctx.id(obj.get("image_id"), &field("image_id"))?;
        let category_id = ctx.id(obj.get("category_id"), &field("category_id"))?;
        let bbox = ctx.bbox(obj.get("bbox"), &field("bbox"))?;
        let score = ctx.number(obj.get("score"), &field("score"))?;
        let record = images.get_mut(&image_id).ok_or_else(|| MetricsError::UnknownImage {
            path: results_name.to_path_buf(),
            field: field("image_id"),
            image_id,
        })?;
        record.detections.push(Detection { bbox, score, category_id });
    }
    build(categories, images)
}

fn build(categories: Vec<u64>, images: BTreeMap<u64, ImageRecord>) -> Result<DetectionStats, MetricsError> {
    let mut stats = DetectionStats::new(categories);
    for (id, record) in images {
        stats.add_image(id, record.ground_truth, record.detections)?;
    }
    Ok(stats)
}

type GroundTruthParts = (Vec<u64>, BTreeMap<u64, ImageRecord>);

fn parse_ground_truth(root: &Value, path: &Path) -> Result<GroundTruthParts, MetricsError> {
    let coco = parse_instances(root, path)?;
    let mut records = vec![ImageRecord::default(); coco.images.len()];
    for ann in &coco.annotations {
        records[ann.image].ground_truth.push(ann.ground_truth());
    }
    let images = coco.images.iter().map(|img| img.id).zip(records).collect();
    Ok((coco.categories.iter().map(|c| c.id).collect(), images))
}

/// Names the file in errors.
struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, field: &str, message: &str) -> MetricsError {
        MetricsError::Malformed {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message: message.to_string(),
        }
    }

    fn id(&self, v: Option<&Value>, field: &str) -> Result<u64, MetricsError> {
        match v {
            None => Err(self.err(field, "missing")),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.err(field, &format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn number(&self, v: Option<&Value>, field: &str) -> Result<f64, MetricsError> {
        match v {
            None => Err(self.err(field, "missing")),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(field, &format!("expected a finite number, found {v}"))),
        }
    }

    fn bbox(&self, v: Option<&Value>, field: &str) -> Result<[f64; 4], MetricsError> {
        let v = v.ok_or_else(|| self.err(field, "missing"))?;
        let items =
            v.as_array().filter(|a| a.len() == 4).ok_or_else(|| self.err(field, "expected 4 numbers"))?;
        let mut out = [0.0; 4];
        for (k, item) in items.iter().enumerate() {
            out[k] = item
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(field, "expected 4 numbers"))?;
        }
        Ok(out)
    }
}
