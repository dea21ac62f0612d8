//! Single-label classification: a confusion matrix and the metrics derived from it.
//!
//! Macro averages match scikit-learn's
//! `precision_recall_fscore_support(y_true, y_pred, labels=range(num_classes),
//! average='macro', zero_division=0)`: **every** class `0..num_classes` takes
//! part in the mean, including classes absent from both targets and
//! predictions (they contribute 0 to each average). Accuracy matches
//! `accuracy_score`.

use serde::{Deserialize, Deserializer, Serialize};

use crate::confusion::{ConfusionMatrix, ConfusionWire};
use crate::numeric;
use crate::MetricsError;

/// Mergeable classification statistics: a `num_classes x num_classes` confusion
/// matrix of counts, rows indexed by target, columns by prediction.
///
/// Deserialisation validates the shape (a `num_classes²` matrix), so statistics
/// received from a worker cannot make `finish` panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ClassificationStats {
    matrix: ConfusionMatrix,
}

impl<'de> Deserialize<'de> for ClassificationStats {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = ConfusionWire::deserialize(deserializer)?;
        Self::new(wire.num_classes)
            .and_then(|_| ConfusionMatrix::from_wire(wire, "classification"))
            .map(|matrix| Self { matrix })
            .map_err(serde::de::Error::custom)
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
        Ok(Self { matrix: ConfusionMatrix::zeros(num_classes) })
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.matrix.num_classes()
    }

    /// Count of samples with target `target` predicted as `pred`.
    pub fn count(&self, target: usize, pred: usize) -> u64 {
        self.matrix.count(target, pred)
    }

    /// Records one sample. Both indices must be below `num_classes`.
    pub fn add(&mut self, pred: usize, target: usize) -> Result<(), MetricsError> {
        let num_classes = self.num_classes();
        for (what, value) in [("classification prediction", pred), ("classification target", target)] {
            if value >= num_classes {
                return Err(MetricsError::ClassOutOfRange { what: what.to_string(), value, num_classes });
            }
        }
        self.matrix.add(target, pred, 1);
        Ok(())
    }

    /// Adds the counts of `other`; fails (leaving `self` unchanged) when the
    /// number of classes differs.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        self.matrix.merge(&other.matrix, "classification merge")
    }

    /// Computes the metrics. Depends only on the counts, so it is independent of
    /// the order in which samples were added or statistics merged.
    pub fn finish(&self) -> ClassificationMetrics {
        let div = |num: f64, den: u64| if den == 0 { 0.0 } else { num / den as f64 };
        let per_class: Vec<ClassMetrics> = self
            .matrix
            .class_totals()
            .into_iter()
            .map(|t| ClassMetrics {
                precision: div(t.hits as f64, t.predictions),
                recall: div(t.hits as f64, t.targets),
                f1: div(2.0 * t.hits as f64, t.targets + t.predictions),
                support: t.targets,
            })
            .collect();
        let macro_of =
            |f: fn(&ClassMetrics) -> f64| numeric::mean(&per_class.iter().map(f).collect::<Vec<_>>());
        ClassificationMetrics {
            accuracy: self.matrix.accuracy(),
            macro_precision: macro_of(|m| m.precision),
            macro_recall: macro_of(|m| m.recall),
            macro_f1: macro_of(|m| m.f1),
            confusion: self.matrix.rows(),
            per_class,
        }
    }
}
