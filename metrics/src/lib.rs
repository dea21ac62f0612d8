//! Metric math for the multi-task vision trainer, computed from **mergeable
//! sufficient statistics** (pure Rust, no torch).
//!
//! Workers accumulate statistics on their shard of the validation set,
//! serialise them as JSON (serde) and send them to the coordinator, which merges
//! them and finishes the metrics. Distributed evaluation gives exactly — to the
//! last bit — the numbers a single process gives on the same data, whatever the
//! order in which shards or images arrive: statistics are either counts
//! (confusion matrices) or records keyed by sample/image id (`BTreeMap`), and
//! `finish` only looks at them in key order. The reference tools
//! (scikit-learn, pycocotools, numpy) are reproduced operation by operation,
//! including numpy's pairwise summation ([`numeric`]).
//!
//! Module layout:
//! - `confusion`: the confusion matrix classification and segmentation count into;
//! - [`classification`]: confusion matrix → accuracy, macro precision/recall/F1;
//! - [`multilabel`]: per-sample scores/labels → per-class AP and mAP;
//! - [`segmentation`]: pixel confusion matrix → per-class IoU, mIoU, pixel accuracy;
//! - [`detection`]: per-image boxes → the 12 COCO bbox numbers (pycocotools' `COCOeval`);
//! - [`coco`]: the COCO instances reader (shared with the worker), and COCO ground truth and
//!   results files → [`DetectionStats`];
//! - [`report`]: the [`EvalStats`] bundle and the flat [`EvalReport`] map;
//! - [`numeric`]: numpy-compatible summation and `linspace`;
//! - [`MetricsError`]: the single error type.
#![warn(missing_docs)]

pub mod classification;
pub mod coco;
mod confusion;
pub mod detection;
mod error;
pub mod multilabel;
pub mod numeric;
pub mod report;
pub mod segmentation;

pub use classification::{ClassMetrics, ClassificationMetrics, ClassificationStats};
pub use detection::{Detection, DetectionMetrics, DetectionStats, GroundTruth, ImageRecord};
pub use error::MetricsError;
pub use multilabel::{MultiLabelMetrics, MultiLabelSample, MultiLabelStats};
pub use report::{metric_task, render_table, task_of, EvalReport, EvalStats};
pub use segmentation::{SegmentationMetrics, SegmentationStats, IGNORE_INDEX};
