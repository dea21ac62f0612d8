//! Semantic segmentation: a pixel confusion matrix, finished into IoU metrics.
//!
//! mIoU is a NaN-mean (as mmseg and torchmetrics with NaN-ignore compute it): a
//! class whose union is empty (absent from both prediction and ground truth) has
//! no IoU and is skipped, rather than counted as 0 or 1. The mean is taken the
//! way `np.nanmean` takes it, so it is bit-identical to a numpy reference.

use serde::{Deserialize, Deserializer, Serialize};

use crate::confusion::{ConfusionMatrix, ConfusionWire};
use crate::numeric;
use crate::MetricsError;

/// Target value meaning "ignore this pixel".
pub const IGNORE_INDEX: u8 = 255;

/// Mergeable segmentation statistics: a `num_classes x num_classes` pixel
/// confusion matrix, rows indexed by target, columns by prediction.
///
/// Deserialisation validates the shape (a `num_classes²` matrix, at most 255
/// classes), so statistics received from a worker cannot make `finish` panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SegmentationStats {
    matrix: ConfusionMatrix,
}

impl<'de> Deserialize<'de> for SegmentationStats {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = ConfusionWire::deserialize(deserializer)?;
        Self::new(wire.num_classes)
            .and_then(|_| ConfusionMatrix::from_wire(wire, "segmentation"))
            .map(|matrix| Self { matrix })
            .map_err(serde::de::Error::custom)
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
        Ok(Self { matrix: ConfusionMatrix::zeros(num_classes) })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.matrix.num_classes()
    }

    /// Pixel count with target `target` predicted as `pred`.
    pub fn count(&self, target: usize, pred: usize) -> u64 {
        self.matrix.count(target, pred)
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
        let n = self.num_classes();
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
                self.matrix.add(t as usize, p as usize, 1);
            }
        }
        Ok(())
    }

    /// Adds the counts of `other`; fails (leaving `self` unchanged) when the
    /// number of classes differs.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        self.matrix.merge(&other.matrix, "segmentation merge")
    }

    /// Computes IoU per class, mIoU and pixel accuracy.
    pub fn finish(&self) -> SegmentationMetrics {
        let per_class_iou: Vec<Option<f64>> = self
            .matrix
            .class_totals()
            .into_iter()
            .map(|t| {
                let union = t.targets + t.predictions - t.hits;
                (union > 0).then(|| t.hits as f64 / union as f64)
            })
            .collect();
        SegmentationMetrics {
            miou: numeric::nan_mean(&per_class_iou).unwrap_or(f64::NAN),
            pixel_accuracy: self.matrix.accuracy(),
            per_class_iou,
        }
    }
}
