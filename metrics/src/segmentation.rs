//! Semantic segmentation: a pixel confusion matrix, finished into IoU metrics.
//!
//! mIoU is a NaN-mean (as mmseg and torchmetrics with NaN-ignore compute it): a
//! class whose union is empty (absent from both prediction and ground truth) has
//! no IoU and is skipped, rather than counted as 0 or 1. The mean is taken the
//! way `np.nanmean` takes it, so it is bit-identical to a numpy reference.

use serde::{Deserialize, Serialize};

use crate::numeric;
use crate::MetricsError;

/// Target value meaning "ignore this pixel".
pub const IGNORE_INDEX: u8 = 255;

/// Mergeable segmentation statistics: a `num_classes x num_classes` pixel
/// confusion matrix, rows indexed by target, columns by prediction.
///
/// Deserialisation validates the shape (a `num_classes²` matrix, at most 255
/// classes), so statistics received from a worker cannot make `finish` panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SegmentationStatsWire")]
pub struct SegmentationStats {
    num_classes: usize,
    /// Row-major counts: `confusion[target * num_classes + pred]`.
    confusion: Vec<u64>,
}

#[derive(Deserialize)]
struct SegmentationStatsWire {
    num_classes: usize,
    confusion: Vec<u64>,
}

impl TryFrom<SegmentationStatsWire> for SegmentationStats {
    type Error = MetricsError;

    fn try_from(wire: SegmentationStatsWire) -> Result<Self, MetricsError> {
        let empty = Self::new(wire.num_classes)?;
        if wire.confusion.len() != empty.confusion.len() {
            return Err(MetricsError::LengthMismatch {
                what: "segmentation confusion vs num_classes²".to_string(),
                left: wire.confusion.len(),
                right: empty.confusion.len(),
            });
        }
        Ok(Self { confusion: wire.confusion, ..empty })
    }
}

/// Finished segmentation metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SegmentationMetrics {
    /// Mean IoU over classes with a non-empty union; NaN if there is none.
    pub miou: f64,
    /// IoU per class; `None` when the class is absent from prediction and target.
    pub per_class_iou: Vec<Option<f64>>,
    /// Correct pixels / labelled pixels (ignored pixels excluded); NaN if none.
    pub pixel_accuracy: f64,
}

impl SegmentationStats {
    /// Empty statistics for `num_classes` classes, between 1 and 255 (255 is the
    /// ignore label and cannot be a class).
    pub fn new(num_classes: usize) -> Result<Self, MetricsError> {
        if num_classes == 0 || num_classes > IGNORE_INDEX as usize {
            return Err(MetricsError::InvalidNumClasses {
                what: "segmentation",
                num_classes,
                reason: "must be between 1 and 255",
            });
        }
        Ok(Self { num_classes, confusion: vec![0; num_classes * num_classes] })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Pixel count with target `target` predicted as `pred`.
    pub fn count(&self, target: usize, pred: usize) -> u64 {
        self.confusion[target * self.num_classes + pred]
    }

    /// Adds one image (or any batch of pixels). `pred` and `target` must have the
    /// same length; target pixels equal to 255 are ignored; every other value must
    /// be below `num_classes`. On error nothing is counted.
    pub fn add(&mut self, pred: &[u8], target: &[u8]) -> Result<(), MetricsError> {
        if pred.len() != target.len() {
            return Err(MetricsError::LengthMismatch {
                what: "segmentation pred/target".to_string(),
                left: pred.len(),
                right: target.len(),
            });
        }
        let n = self.num_classes;
        for (i, (&p, &t)) in pred.iter().zip(target).enumerate() {
            if t != IGNORE_INDEX && t as usize >= n {
                return Err(MetricsError::ClassOutOfRange {
                    what: format!("segmentation target at pixel {i}"),
                    value: t as usize,
                    num_classes: n,
                });
            }
            if p as usize >= n {
                return Err(MetricsError::ClassOutOfRange {
                    what: format!("segmentation prediction at pixel {i}"),
                    value: p as usize,
                    num_classes: n,
                });
            }
        }
        for (&p, &t) in pred.iter().zip(target) {
            if t != IGNORE_INDEX {
                self.confusion[t as usize * n + p as usize] += 1;
            }
        }
        Ok(())
    }

    /// Adds the counts of `other`; fails (leaving `self` unchanged) when the
    /// number of classes differs.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        if self.num_classes != other.num_classes || self.confusion.len() != other.confusion.len() {
            return Err(MetricsError::NumClassesMismatch {
                what: "segmentation merge",
                expected: self.num_classes,
                found: other.num_classes,
            });
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        Ok(())
    }

    /// Computes IoU per class, mIoU and pixel accuracy.
    pub fn finish(&self) -> SegmentationMetrics {
        let n = self.num_classes;
        let mut correct = 0u64;
        let mut total = 0u64;
        let per_class_iou: Vec<Option<f64>> = (0..n)
            .map(|c| {
                let inter = self.count(c, c);
                let target: u64 = (0..n).map(|p| self.count(c, p)).sum();
                let pred: u64 = (0..n).map(|t| self.count(t, c)).sum();
                correct += inter;
                total += target;
                let union = target + pred - inter;
                (union > 0).then(|| inter as f64 / union as f64)
            })
            .collect();
        SegmentationMetrics {
            miou: numeric::nan_mean(&per_class_iou).unwrap_or(f64::NAN),
            pixel_accuracy: if total == 0 { f64::NAN } else { correct as f64 / total as f64 },
            per_class_iou,
        }
    }
}
