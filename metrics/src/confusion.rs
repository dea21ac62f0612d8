//! The confusion matrix: the sufficient statistic of single-label classification (one count
//! per sample) and of semantic segmentation (one count per pixel).
//!
//! Rows are indexed by target, columns by prediction. Counts add, so merging is exact and
//! order-independent. Serialised as `{"num_classes": n, "confusion": [n² counts, row-major]}`.

use serde::{Deserialize, Serialize};

use crate::MetricsError;

/// A `num_classes × num_classes` matrix of counts, `confusion[target * num_classes + pred]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct ConfusionMatrix {
    num_classes: usize,
    confusion: Vec<u64>,
}

/// The serialised form, checked by [`ConfusionMatrix::from_wire`] before use.
#[derive(Deserialize)]
pub(crate) struct ConfusionWire {
    pub(crate) num_classes: usize,
    pub(crate) confusion: Vec<u64>,
}

/// One class's totals: true positives, target count (row sum), prediction count (column sum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClassTotals {
    pub(crate) hits: u64,
    pub(crate) targets: u64,
    pub(crate) predictions: u64,
}

impl ConfusionMatrix {
    /// All zeros; `num_classes` is validated by the statistics that own the matrix.
    pub(crate) fn zeros(num_classes: usize) -> Self {
        Self { num_classes, confusion: vec![0; num_classes * num_classes] }
    }

    /// The matrix a wire value describes, with `num_classes` already validated by the caller;
    /// `what` names the statistics in the error when the counts are not `num_classes²`.
    pub(crate) fn from_wire(wire: ConfusionWire, what: &str) -> Result<Self, MetricsError> {
        let expected = wire.num_classes * wire.num_classes;
        if wire.confusion.len() != expected {
            return Err(MetricsError::LengthMismatch {
                what: format!("{what} confusion vs num_classes²"),
                left: wire.confusion.len(),
                right: expected,
            });
        }
        Ok(Self { num_classes: wire.num_classes, confusion: wire.confusion })
    }

    pub(crate) fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub(crate) fn count(&self, target: usize, pred: usize) -> u64 {
        self.confusion[target * self.num_classes + pred]
    }

    /// Adds `n` to cell (target, pred); both must be below `num_classes`.
    pub(crate) fn add(&mut self, target: usize, pred: usize, n: u64) {
        self.confusion[target * self.num_classes + pred] += n;
    }

    /// Adds the counts of `other`; fails (leaving `self` unchanged) when the sizes differ.
    pub(crate) fn merge(&mut self, other: &Self, what: &'static str) -> Result<(), MetricsError> {
        if self.num_classes != other.num_classes || self.confusion.len() != other.confusion.len() {
            return Err(MetricsError::NumClassesMismatch {
                what,
                expected: self.num_classes,
                found: other.num_classes,
            });
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        Ok(())
    }

    /// Per class: hits, targets and predictions.
    pub(crate) fn class_totals(&self) -> Vec<ClassTotals> {
        let n = self.num_classes;
        (0..n)
            .map(|c| ClassTotals {
                hits: self.count(c, c),
                targets: (0..n).map(|p| self.count(c, p)).sum(),
                predictions: (0..n).map(|t| self.count(t, c)).sum(),
            })
            .collect()
    }

    /// Trace / total (accuracy, or pixel accuracy); NaN when nothing was counted.
    pub(crate) fn accuracy(&self) -> f64 {
        let totals = self.class_totals();
        let correct: u64 = totals.iter().map(|t| t.hits).sum();
        let total: u64 = totals.iter().map(|t| t.targets).sum();
        if total == 0 {
            f64::NAN
        } else {
            correct as f64 / total as f64
        }
    }

    /// The rows, `[target][pred]`.
    pub(crate) fn rows(&self) -> Vec<Vec<u64>> {
        self.confusion.chunks(self.num_classes.max(1)).map(<[u64]>::to_vec).collect()
    }
}
