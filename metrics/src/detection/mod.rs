//! COCO bounding-box evaluation from mergeable per-image records.
//!
//! [`DetectionStats`] keeps, per image id, the ground truth and detections in the
//! order they were added. [`DetectionStats::finish`] reproduces pycocotools'
//! `COCOeval(iouType='bbox')` `evaluate()` / `accumulate()` / `summarize()`
//! step by step (default parameters: IoU thresholds `0.50:0.05:0.95`, 101 recall
//! thresholds, `maxDets = [1, 10, 100]`, area ranges all/small/medium/large),
//! including its tie-breaking (stable sorts, detection order within an image)
//! and numpy's summation order, so results are bit-identical to pycocotools.
//!
//! Images are evaluated in image-id order, so results do not depend on the order
//! in which images were added or statistics merged.
//!
//! Known deviation: pycocotools records a match by ground-truth *annotation id*
//! and treats id 0 as "unmatched"; here matches are tracked by position, so a
//! ground-truth annotation with id 0 behaves like any other.

mod accumulate;
mod evaluate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MetricsError;

/// A ground-truth box.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    /// Category id.
    pub category_id: u64,
    /// Annotation area (COCO's `area` field, used for the area ranges; for COCO
    /// instances this is the mask area, not the box area).
    pub area: f64,
    /// Crowd region: never counted as a miss, may absorb any number of detections.
    pub iscrowd: bool,
}

/// A detection (one entry of a COCO results file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// `[x, y, width, height]`.
    pub bbox: [f64; 4],
    /// Confidence score.
    pub score: f64,
    /// Category id.
    pub category_id: u64,
}

impl Detection {
    /// Area used for the area ranges: `width * height`, as pycocotools' `loadRes` sets it.
    pub fn area(&self) -> f64 {
        self.bbox[2] * self.bbox[3]
    }
}

/// Ground truth and detections of one image, in insertion order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Ground-truth boxes (all categories).
    pub ground_truth: Vec<GroundTruth>,
    /// Detections (all categories); their order breaks score ties.
    pub detections: Vec<Detection>,
}

/// Mergeable detection statistics: the evaluated category ids and the per-image
/// records keyed by image id. Merge is a union of disjoint image sets.
///
/// Deserialisation re-validates (sorted unique categories, finite values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DetectionStatsWire")]
pub struct DetectionStats {
    category_ids: Vec<u64>,
    images: BTreeMap<u64, ImageRecord>,
}

#[derive(Deserialize)]
struct DetectionStatsWire {
    category_ids: Vec<u64>,
    images: BTreeMap<u64, ImageRecord>,
}

impl TryFrom<DetectionStatsWire> for DetectionStats {
    type Error = MetricsError;

    fn try_from(wire: DetectionStatsWire) -> Result<Self, MetricsError> {
        let mut stats = Self::new(wire.category_ids.iter().copied());
        if stats.category_ids != wire.category_ids {
            return Err(MetricsError::CategoryMismatch {
                left: stats.category_ids,
                right: wire.category_ids,
            });
        }
        for (id, record) in wire.images {
            stats.add_image(id, record.ground_truth, record.detections)?;
        }
        Ok(stats)
    }
}

/// The 12 COCO summary numbers plus per-category AP. `-1` marks an undefined value
/// (no non-ignored ground truth in the relevant categories/areas).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DetectionMetrics {
    /// AP @[IoU=0.50:0.95, area=all, maxDets=100].
    pub ap: f64,
    /// AP @[IoU=0.50, area=all, maxDets=100].
    pub ap50: f64,
    /// AP @[IoU=0.75, area=all, maxDets=100].
    pub ap75: f64,
    /// AP @[IoU=0.50:0.95, area=small, maxDets=100].
    pub ap_small: f64,
    /// AP @[IoU=0.50:0.95, area=medium, maxDets=100].
    pub ap_medium: f64,
    /// AP @[IoU=0.50:0.95, area=large, maxDets=100].
    pub ap_large: f64,
    /// AR @[IoU=0.50:0.95, area=all, maxDets=1].
    pub ar1: f64,
    /// AR @[IoU=0.50:0.95, area=all, maxDets=10].
    pub ar10: f64,
    /// AR @[IoU=0.50:0.95, area=all, maxDets=100].
    pub ar100: f64,
    /// AR @[IoU=0.50:0.95, area=small, maxDets=100].
    pub ar_small: f64,
    /// AR @[IoU=0.50:0.95, area=medium, maxDets=100].
    pub ar_medium: f64,
    /// AR @[IoU=0.50:0.95, area=large, maxDets=100].
    pub ar_large: f64,
    /// AP @[IoU=0.50:0.95, area=all, maxDets=100] of each category, `-1` when the
    /// category has no non-ignored ground truth.
    pub per_category_ap: BTreeMap<u64, f64>,
}

impl DetectionMetrics {
    /// The 12 numbers in `COCOeval.stats` order: AP, AP50, AP75, APs, APm, APl,
    /// AR1, AR10, AR100, ARs, ARm, ARl.
    pub fn stats(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

impl DetectionStats {
    /// Empty statistics evaluating the given category ids (sorted and
    /// deduplicated, as pycocotools does). Boxes of other categories are kept but
    /// never evaluated.
    pub fn new(category_ids: impl IntoIterator<Item = u64>) -> Self {
        let mut category_ids: Vec<u64> = category_ids.into_iter().collect();
        category_ids.sort_unstable();
        category_ids.dedup();
        Self { category_ids, images: BTreeMap::new() }
    }

    /// The evaluated category ids, ascending.
    pub fn category_ids(&self) -> &[u64] {
        &self.category_ids
    }

    /// The per-image records, ordered by image id.
    pub fn images(&self) -> &BTreeMap<u64, ImageRecord> {
        &self.images
    }

    /// Adds one image with its ground truth and detections (either may be empty).
    /// Fails on an image id already present or a non-finite box or score.
    pub fn add_image(
        &mut self,
        image_id: u64,
        ground_truth: Vec<GroundTruth>,
        detections: Vec<Detection>,
    ) -> Result<(), MetricsError> {
        if self.images.contains_key(&image_id) {
            return Err(MetricsError::DuplicateId { what: "detection image", id: image_id });
        }
        for (i, g) in ground_truth.iter().enumerate() {
            check_finite(&g.bbox, g.area, || format!("image {image_id} ground truth {i}"))?;
        }
        for (i, d) in detections.iter().enumerate() {
            check_finite(&d.bbox, d.score, || format!("image {image_id} detection {i}"))?;
        }
        self.images.insert(image_id, ImageRecord { ground_truth, detections });
        Ok(())
    }

    /// Unions the images of `other` into `self`. Fails (leaving `self` unchanged)
    /// when the category ids differ or an image id is present in both.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        if self.category_ids != other.category_ids {
            return Err(MetricsError::CategoryMismatch {
                left: self.category_ids.clone(),
                right: other.category_ids.clone(),
            });
        }
        if let Some(id) = other.images.keys().find(|id| self.images.contains_key(id)) {
            return Err(MetricsError::DuplicateId { what: "detection image", id: *id });
        }
        for (id, record) in &other.images {
            self.images.insert(*id, record.clone());
        }
        Ok(())
    }

    /// Runs the COCO evaluation and returns the summary.
    pub fn finish(&self) -> DetectionMetrics {
        let per_image = evaluate::evaluate_all(self);
        let acc = accumulate::accumulate(&per_image, self.category_ids.len());
        acc.summarize(&self.category_ids)
    }
}

fn check_finite(bbox: &[f64; 4], value: f64, what: impl Fn() -> String) -> Result<(), MetricsError> {
    for (k, &v) in bbox.iter().enumerate() {
        if !v.is_finite() {
            return Err(MetricsError::NonFinite { what: format!("{} bbox[{k}]", what()), value: v });
        }
    }
    if !value.is_finite() {
        return Err(MetricsError::NonFinite { what: format!("{} score/area", what()), value });
    }
    Ok(())
}
