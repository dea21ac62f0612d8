//! Multi-label classification: per-sample scores and labels, finished into mAP.
//!
//! Average precision per class is scikit-learn's `average_precision_score`
//! (step-wise integral of the precision-recall curve, no interpolation; tied
//! scores form a single threshold). mAP is the mean over the classes that have
//! at least one positive sample; classes without positives are left out (and
//! reported as `None`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::numeric;
use crate::MetricsError;

/// Scores and ground-truth labels of one sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelSample {
    /// One score per class (higher = more confident).
    pub scores: Vec<f64>,
    /// One label per class (`true` = the class is present).
    pub labels: Vec<bool>,
}

/// Mergeable multi-label statistics: the per-sample records keyed by sample id.
///
/// Average precision is not decomposable into counts, so the records
/// themselves are the sufficient statistics; merge is a union of disjoint
/// sample sets.
///
/// Deserialisation re-checks every sample (lengths, finite scores), so
/// statistics received from a worker cannot make `finish` panic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "MultiLabelStatsWire")]
pub struct MultiLabelStats {
    num_classes: usize,
    samples: BTreeMap<u64, MultiLabelSample>,
}

#[derive(Deserialize)]
struct MultiLabelStatsWire {
    num_classes: usize,
    samples: BTreeMap<u64, MultiLabelSample>,
}

impl TryFrom<MultiLabelStatsWire> for MultiLabelStats {
    type Error = MetricsError;

    fn try_from(wire: MultiLabelStatsWire) -> Result<Self, MetricsError> {
        let mut stats = Self::new(wire.num_classes);
        for (id, sample) in wire.samples {
            stats.add(id, sample.scores, sample.labels)?;
        }
        Ok(stats)
    }
}

/// Finished multi-label metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelMetrics {
    /// Mean average precision over classes with at least one positive; NaN if none has.
    pub map: f64,
    /// Average precision per class, `None` for classes without positives.
    pub per_class_ap: Vec<Option<f64>>,
}

impl MultiLabelStats {
    /// Empty statistics for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self { num_classes, samples: BTreeMap::new() }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// The records, ordered by sample id.
    pub fn samples(&self) -> &BTreeMap<u64, MultiLabelSample> {
        &self.samples
    }

    /// Records one sample. Fails on a duplicate id, on a length other than
    /// `num_classes`, or on a non-finite score.
    pub fn add(&mut self, sample_id: u64, scores: Vec<f64>, labels: Vec<bool>) -> Result<(), MetricsError> {
        for (what, len) in [("scores", scores.len()), ("labels", labels.len())] {
            if len != self.num_classes {
                return Err(MetricsError::LengthMismatch {
                    what: format!("multi-label sample {sample_id} {what} vs num_classes"),
                    left: len,
                    right: self.num_classes,
                });
            }
        }
        if let Some((c, &s)) = scores.iter().enumerate().find(|(_, s)| !s.is_finite()) {
            return Err(MetricsError::NonFinite {
                what: format!("multi-label sample {sample_id} score of class {c}"),
                value: s,
            });
        }
        if self.samples.contains_key(&sample_id) {
            return Err(MetricsError::DuplicateId { what: "multi-label sample", id: sample_id });
        }
        self.samples.insert(sample_id, MultiLabelSample { scores, labels });
        Ok(())
    }

    /// Unions the samples of `other` into `self`. Fails (leaving `self`
    /// unchanged) on a class-count mismatch or a sample id present in both.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        if self.num_classes != other.num_classes {
            return Err(MetricsError::NumClassesMismatch {
                what: "multi-label merge",
                expected: self.num_classes,
                found: other.num_classes,
            });
        }
        if let Some(id) = other.samples.keys().find(|id| self.samples.contains_key(id)) {
            return Err(MetricsError::DuplicateId { what: "multi-label sample", id: *id });
        }
        for (id, sample) in &other.samples {
            self.samples.insert(*id, sample.clone());
        }
        Ok(())
    }

    /// Computes per-class AP and mAP.
    pub fn finish(&self) -> MultiLabelMetrics {
        let per_class_ap: Vec<Option<f64>> = (0..self.num_classes)
            .map(|c| {
                let column: Vec<(f64, bool)> =
                    self.samples.values().map(|s| (s.scores[c], s.labels[c])).collect();
                average_precision(&column)
            })
            .collect();
        let present: Vec<f64> = per_class_ap.iter().flatten().copied().collect();
        MultiLabelMetrics { map: numeric::mean(&present), per_class_ap }
    }
}

/// scikit-learn's `average_precision_score` for one binary problem given as
/// `(score, is_positive)` pairs; `None` when there is no positive.
///
/// Follows `_binary_clf_curve` + `precision_recall_curve` +
/// `_binary_uninterpolated_average_precision` operation by operation, including
/// the order of the final (pairwise) summation, so the result is bit-identical.
pub fn average_precision(samples: &[(f64, bool)]) -> Option<f64> {
    if !samples.iter().any(|s| s.1) {
        return None;
    }
    let mut sorted = samples.to_vec();
    // Descending by score; order among ties is irrelevant (ties form one threshold).
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let n = sorted.len();
    let mut tps = Vec::new();
    let mut fps = Vec::new();
    let mut cum = 0.0f64;
    for i in 0..n {
        if sorted[i].1 {
            cum += 1.0;
        }
        if i + 1 == n || sorted[i].0 != sorted[i + 1].0 {
            tps.push(cum);
            fps.push(1.0 + i as f64 - cum);
        }
    }
    let last = *tps.last().expect("at least one threshold");
    let precision: Vec<f64> = tps.iter().zip(&fps).map(|(&tp, &fp)| tp / (tp + fp)).collect();
    let recall: Vec<f64> = tps.iter().map(|&tp| tp / last).collect();
    // precision_recall_curve reverses and appends (precision 1, recall 0).
    let mut p_rev: Vec<f64> = precision.into_iter().rev().collect();
    p_rev.push(1.0);
    let mut r_rev: Vec<f64> = recall.into_iter().rev().collect();
    r_rev.push(0.0);
    let terms: Vec<f64> = (0..r_rev.len() - 1).map(|i| (r_rev[i + 1] - r_rev[i]) * p_rev[i]).collect();
    let ap = -numeric::pairwise_sum(&terms);
    Some(if ap > 0.0 { ap } else { 0.0 })
}
