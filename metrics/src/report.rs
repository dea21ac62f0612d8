//! The bundle of all statistics a worker sends, and the finished report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ClassificationMetrics, ClassificationStats, DetectionMetrics, DetectionStats, MetricsError,
    MultiLabelMetrics, MultiLabelStats, SegmentationMetrics, SegmentationStats,
};

/// Statistics for every task head; a task a worker did not evaluate is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    /// Single-label classification statistics.
    pub classification: Option<ClassificationStats>,
    /// Multi-label classification statistics.
    pub multilabel: Option<MultiLabelStats>,
    /// COCO detection statistics.
    pub detection: Option<DetectionStats>,
    /// Semantic segmentation statistics.
    pub segmentation: Option<SegmentationStats>,
}

/// Finished metrics for every task present in the [`EvalStats`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Classification metrics.
    pub classification: Option<ClassificationMetrics>,
    /// Multi-label metrics.
    pub multilabel: Option<MultiLabelMetrics>,
    /// Detection metrics.
    pub detection: Option<DetectionMetrics>,
    /// Segmentation metrics.
    pub segmentation: Option<SegmentationMetrics>,
}

fn merge_part<T: Clone>(
    mine: &mut Option<T>,
    theirs: &Option<T>,
    merge: impl FnOnce(&mut T, &T) -> Result<(), MetricsError>,
) -> Result<(), MetricsError> {
    match (mine.as_mut(), theirs) {
        (_, None) => Ok(()),
        (None, Some(t)) => {
            *mine = Some(t.clone());
            Ok(())
        }
        (Some(m), Some(t)) => merge(m, t),
    }
}

impl EvalStats {
    /// Merges every part; a part present on one side only is taken as is.
    ///
    /// All parts are checked before any is modified, so on error `self` is unchanged.
    pub fn merge(&mut self, other: &Self) -> Result<(), MetricsError> {
        let mut merged = self.clone();
        merge_part(&mut merged.classification, &other.classification, |a, b| a.merge(b))?;
        merge_part(&mut merged.multilabel, &other.multilabel, |a, b| a.merge(b))?;
        merge_part(&mut merged.detection, &other.detection, |a, b| a.merge(b))?;
        merge_part(&mut merged.segmentation, &other.segmentation, |a, b| a.merge(b))?;
        *self = merged;
        Ok(())
    }

    /// Finishes every present part.
    pub fn finish(&self) -> EvalReport {
        EvalReport {
            classification: self.classification.as_ref().map(ClassificationStats::finish),
            multilabel: self.multilabel.as_ref().map(MultiLabelStats::finish),
            detection: self.detection.as_ref().map(DetectionStats::finish),
            segmentation: self.segmentation.as_ref().map(SegmentationStats::finish),
        }
    }
}

impl EvalReport {
    /// Flat metric map for logging: `accuracy`, `precision`, `recall`, `F1`
    /// (macro averages) for classification; `mAP` for multi-label; `AP`, `AP50`,
    /// `AP75`, `APs`, `APm`, `APl`, `AR1`, `AR10`, `AR100`, `ARs`, `ARm`, `ARl`
    /// for detection (`-1` = undefined, as pycocotools); `mIoU`, `pixel_accuracy`
    /// for segmentation. Only keys of present tasks appear; undefined
    /// classification/multi-label/segmentation values are NaN.
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        let mut map = BTreeMap::new();
        let mut put = |k: &str, v: f64| {
            map.insert(k.to_string(), v);
        };
        if let Some(c) = &self.classification {
            put("accuracy", c.accuracy);
            put("precision", c.macro_precision);
            put("recall", c.macro_recall);
            put("F1", c.macro_f1);
        }
        if let Some(m) = &self.multilabel {
            put("mAP", m.map);
        }
        if let Some(d) = &self.detection {
            const KEYS: [&str; 12] =
                ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];
            for (k, v) in KEYS.iter().zip(d.stats()) {
                put(k, v);
            }
        }
        if let Some(s) = &self.segmentation {
            put("mIoU", s.miou);
            put("pixel_accuracy", s.pixel_accuracy);
        }
        map
    }
}

/// [`task_of`] in the short form of the training log keys (`cls`, `det`, `seg`, as in
/// `loss/cls`).
pub fn metric_task(key: &str) -> Option<&'static str> {
    task_of(key).map(|task| match task {
        "classification" => "cls",
        "detection" => "det",
        _ => "seg",
    })
}

/// The task a key of [`EvalReport::to_map`] belongs to: `classification` (multi-label `mAP`
/// included), `detection` or `segmentation`; `None` for a key it never writes.
pub fn task_of(key: &str) -> Option<&'static str> {
    match key {
        "accuracy" | "precision" | "recall" | "F1" | "mAP" => Some("classification"),
        "AP" | "AP50" | "AP75" | "APs" | "APm" | "APl" | "AR1" | "AR10" | "AR100" | "ARs" | "ARm" | "ARl" => {
            Some("detection")
        }
        "mIoU" | "pixel_accuracy" => Some("segmentation"),
        _ => None,
    }
}

/// Renders a metrics map (as [`EvalReport::to_map`] gives) as a per-task table.
pub fn render_table(map: &BTreeMap<String, f64>) -> String {
    const GROUPS: [(&str, &[&str]); 3] = [
        ("classification", &["accuracy", "precision", "recall", "F1", "mAP"]),
        ("detection", &["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"]),
        ("segmentation", &["mIoU", "pixel_accuracy"]),
    ];
    let mut out = String::new();
    for (task, keys) in GROUPS {
        let cells: Vec<String> =
            keys.iter().filter_map(|k| map.get(*k).map(|v| format!("{k} {v:.4}"))).collect();
        if !cells.is_empty() {
            out.push_str(&format!("  {task:<15} {}\n", cells.join("  ")));
        }
    }
    out
}
