//! Single-label classification: a confusion matrix and the metrics derived from it.
//!
//! Macro averages match scikit-learn's
//! `precision_recall_fscore_support(y_true, y_pred, labels=range(num_classes),
//! average='macro', zero_division=0)`: **every** class `0..num_classes` takes
//! part in the mean, including classes absent from both targets and
//! predictions (they contribute 0 to each average). Accuracy matches
//! `accuracy_score`.

use serde::{Deserialize, Serialize};

use crate::numeric;
use crate::MetricsError;

/// Mergeable classification statistics: a `num_classes x num_classes` confusion
/// matrix of counts, rows indexed by target, columns by prediction.
///
/// Deserialisation validates the shape (a `num_classes²` matrix), so statistics
/// received from a worker cannot make `finish` panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ClassificationStatsWire")]
pub struct ClassificationStats {
    num_classes: usize,
    /// Row-major counts: `confusion[target * num_classes + pred]`.
    confusion: Vec<u64>,
}

#[derive(Deserialize)]
struct ClassificationStatsWire {
    num_classes: usize,
    confusion: Vec<u64>,
}

impl TryFrom<ClassificationStatsWire> for ClassificationStats {
    type Error = MetricsError;

    fn try_from(wire: ClassificationStatsWire) -> Result<Self, MetricsError> {
        let empty = Self::new(wire.num_classes)?;
        if wire.confusion.len() != empty.confusion.len() {
            return Err(MetricsError::LengthMismatch {
                what: "classification confusion vs num_classes²".to_string(),
                left: wire.confusion.len(),
                right: empty.confusion.len(),
            });
        }
        Ok(Self { confusion: wire.confusion, ..empty })
    }
}

/// Precision, recall, F1 and support of one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// `tp / predicted`, 0 when the class was never predicted.
    pub precision: f64,
    /// `tp / support`, 0 when the class never occurs in the targets.
    pub recall: f64,
    /// `2 tp / (support + predicted)`, 0 when both are 0 (scikit-learn's formula).
    pub f1: f64,
    /// Number of samples whose target is this class.
    pub support: u64,
}

/// Finished classification metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// Fraction of correct predictions; NaN when no sample was added.
    pub accuracy: f64,
    /// Unweighted mean of the per-class precisions over all `num_classes` classes.
    pub macro_precision: f64,
    /// Unweighted mean of the per-class recalls over all `num_classes` classes.
    pub macro_recall: f64,
    /// Unweighted mean of the per-class F1 scores over all `num_classes` classes.
    pub macro_f1: f64,
    /// Per-class metrics, indexed by class.
    pub per_class: Vec<ClassMetrics>,
    /// Confusion matrix, `confusion[target][pred]`.
    pub confusion: Vec<Vec<u64>>,
}

impl ClassificationStats {
    /// Empty statistics for `num_classes` classes (at least 1).
    pub fn new(num_classes: usize) -> Result<Self, MetricsError> {
        if num_classes == 0 {
            return Err(MetricsError::InvalidNumClasses {
                what: "classification",
                num_classes,
                reason: "must be at least 1",
            });
        }
        Ok(Self { num_classes, confusion: vec![0; num_classes * num_classes] })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Count of samples with target `target` predicted as `pred`.
    pub fn count(&self, target: usize, pred: usize) -> u64 {
        self.confusion[target * self.num_classes + pred]
    }

    /// Records one sample. Both indices must be below `num_classes`.
    pub fn add(&mut self, pred: usize, target: usize) -> Result<(), MetricsError> {
        for (what, value) in [("classification prediction", pred), ("classification target", target)] {
            if value >= self.num_classes {
                return Err(MetricsError::ClassOutOfRange {
                    what: what.to_string(),
                    value,
                    num_classes: self.num_classes,
                });
            }
        }
        self.confusion[target * self.num_classes + pred] += 1;
        Ok(())
    }

    /// Adds the counts of `other`; fails (leaving `self` unchanged) when the
    /// number of classes differs.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        if self.num_classes != other.num_classes || self.confusion.len() != other.confusion.len() {
            return Err(MetricsError::NumClassesMismatch {
                what: "classification merge",
                expected: self.num_classes,
                found: other.num_classes,
            });
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        Ok(())
    }

    /// Computes the metrics. Depends only on the counts, so it is independent of
    /// the order in which samples were added or statistics merged.
    pub fn finish(&self) -> ClassificationMetrics {
        let n = self.num_classes;
        let mut per_class = Vec::with_capacity(n);
        let mut correct = 0u64;
        let mut total = 0u64;
        for c in 0..n {
            let tp = self.count(c, c);
            let support: u64 = (0..n).map(|p| self.count(c, p)).sum();
            let predicted: u64 = (0..n).map(|t| self.count(t, c)).sum();
            correct += tp;
            total += support;
            let div = |num: f64, den: u64| if den == 0 { 0.0 } else { num / den as f64 };
            per_class.push(ClassMetrics {
                precision: div(tp as f64, predicted),
                recall: div(tp as f64, support),
                f1: div(2.0 * tp as f64, support + predicted),
                support,
            });
        }
        let macro_of =
            |f: fn(&ClassMetrics) -> f64| numeric::mean(&per_class.iter().map(f).collect::<Vec<_>>());
        ClassificationMetrics {
            accuracy: if total == 0 { f64::NAN } else { correct as f64 / total as f64 },
            macro_precision: macro_of(|m| m.precision),
            macro_recall: macro_of(|m| m.recall),
            macro_f1: macro_of(|m| m.f1),
            confusion: self.confusion.chunks(n).map(<[u64]>::to_vec).collect(),
            per_class,
        }
    }
}
