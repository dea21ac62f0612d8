//! The `[model]` and `[tasks]` sections: which network to build and which heads it carries.
use serde::{Deserialize, Serialize};

use crate::JobConfigError;

/// The backbone architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// A ResNet-18-shaped network with one BasicBlock per stage (base width 8 by default): for tests.
    Tiny,
    /// ResNet-18 (BasicBlock, 2-2-2-2).
    Resnet18,
    /// ResNet-34 (BasicBlock, 3-4-6-3).
    Resnet34,
    /// ResNet-50 (Bottleneck, 3-4-6-3).
    Resnet50,
}

/// The normalisation layer used in the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// BatchNorm: batch statistics are the rank's own batch's, so N workers differ from one
    /// process; the running statistics are rank 0's (broadcast to every rank after each step).
    Batch,
    /// SyncBatchNorm: batch statistics over the batches of all ranks (reduced through the job's
    /// collective in forward and backward), so N workers with batch b equal one process with
    /// batch N*b.
    SyncBatch,
    /// GroupNorm (32 groups, fewer where channels are few): independent of the batch.
    Group,
    /// BatchNorm with running statistics and affine parameters frozen (for pretrained weights).
    FrozenBatch,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Backbone: "tiny", "resnet18", "resnet34" or "resnet50".
    pub backbone: BackboneKind,
    /// Base width (channels of the stem and first stage); 0 means 8 for "tiny" and 64 otherwise.
    pub width: u32,
    /// Backbone normalisation: "batch", "sync_batch", "group" or "frozen_batch".
    pub norm: NormKind,
    /// Channels of the FPN outputs P3-P5 and of the heads; 0 means 32 for "tiny" and 256 otherwise.
    pub fpn_channels: u32,
    /// Optional safetensors file with backbone weights named as torchvision's (see docs/MODEL.md).
    pub pretrained: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::Tiny,
            width: 0,
            norm: NormKind::Group,
            fpn_channels: 0,
            pretrained: None,
        }
    }
}

impl ModelSection {
    /// `width` with its default resolved.
    pub fn width(&self) -> u32 {
        match (self.width, self.backbone) {
            (0, BackboneKind::Tiny) => 8,
            (0, _) => 64,
            (w, _) => w,
        }
    }

    /// `fpn_channels` with its default resolved.
    pub fn fpn_channels(&self) -> u32 {
        match (self.fpn_channels, self.backbone) {
            (0, BackboneKind::Tiny) => 32,
            (0, _) => 256,
            (c, _) => c,
        }
    }

    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        let width = self.width();
        if !(4..=256).contains(&width) || !width.is_multiple_of(4) {
            return Err(invalid("model.width", format!("must be a multiple of 4 in 4..=256, got {width}")));
        }
        let fpn = self.fpn_channels();
        if !(4..=1024).contains(&fpn) || !fpn.is_multiple_of(4) {
            return Err(invalid(
                "model.fpn_channels",
                format!("must be a multiple of 4 in 4..=1024, got {fpn}"),
            ));
        }
        if let Some(path) = &self.pretrained {
            if !path.ends_with(".safetensors") {
                return Err(invalid("model.pretrained", format!("`{path}` must be a .safetensors file")));
            }
        }
        Ok(())
    }
}

/// `[tasks]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksSection {
    /// Build and train the image classification head.
    pub classification: bool,
    /// Build and train the FCOS detection head.
    pub detection: bool,
    /// Build and train the semantic segmentation head.
    pub segmentation: bool,
    /// Classification is multi-label (sigmoid per class) instead of single-label (softmax);
    /// must agree with the dataset.
    pub multi_label: bool,
    /// Detections scoring below this (sqrt of class probability times centerness) are dropped.
    pub score_threshold: f64,
    /// IoU above which non-maximum suppression drops the lower-scoring box of the same class.
    pub nms_iou: f64,
    /// Detections kept per image after NMS.
    pub max_detections: u32,
    /// Candidates kept per FPN level before NMS.
    pub pre_nms_top_k: u32,
}

impl Default for TasksSection {
    fn default() -> Self {
        Self {
            classification: true,
            detection: true,
            segmentation: true,
            multi_label: false,
            score_threshold: 0.05,
            nms_iou: 0.6,
            max_detections: 100,
            pre_nms_top_k: 1000,
        }
    }
}

impl TasksSection {
    /// Checks ranges; errors name the key.
    pub fn validate(&self) -> Result<(), JobConfigError> {
        let invalid = |key: &str, message: String| JobConfigError::Invalid { key: key.into(), message };
        if !(self.classification || self.detection || self.segmentation) {
            return Err(invalid(
                "tasks",
                "at least one of tasks.classification, tasks.detection, tasks.segmentation must be true"
                    .into(),
            ));
        }
        if !(0.0..1.0).contains(&self.score_threshold) {
            return Err(invalid(
                "tasks.score_threshold",
                format!("must be in [0, 1), got {}", self.score_threshold),
            ));
        }
        if !(self.nms_iou > 0.0 && self.nms_iou <= 1.0) {
            return Err(invalid("tasks.nms_iou", format!("must be in (0, 1], got {}", self.nms_iou)));
        }
        if self.max_detections == 0 {
            return Err(invalid("tasks.max_detections", "must be at least 1, got 0".into()));
        }
        if self.pre_nms_top_k == 0 {
            return Err(invalid("tasks.pre_nms_top_k", "must be at least 1, got 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::{JobConfig, JobConfigError};

    fn from_toml(extra: &str) -> Result<JobConfig, JobConfigError> {
        JobConfig::from_toml(&format!("[job]\nname = \"a\"\n{extra}"))
    }

    #[test]
    fn sections_parse_and_round_trip() {
        let cfg = from_toml(
            "[model]\nbackbone = \"resnet50\"\nnorm = \"frozen_batch\"\npretrained = \"r50.safetensors\"\n\
             [tasks]\ndetection = false\nmulti_label = true\nnms_iou = 0.5\n",
        )
        .unwrap();
        assert_eq!(cfg.model.backbone, super::BackboneKind::Resnet50);
        assert_eq!((cfg.model.width(), cfg.model.fpn_channels()), (64, 256));
        assert!(!cfg.tasks.detection && cfg.tasks.classification && cfg.tasks.multi_label);
        assert_eq!(JobConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
        let tiny = from_toml("").unwrap();
        assert_eq!((tiny.model.width(), tiny.model.fpn_channels()), (8, 32));
        let sync = from_toml("[model]\nnorm = \"sync_batch\"\n").unwrap();
        assert_eq!(sync.model.norm, super::NormKind::SyncBatch);
    }

    #[test]
    fn invalid_values_name_their_key() {
        for (text, key) in [
            ("[model]\nwidth = 6\n", "model.width"),
            ("[model]\nfpn_channels = 2000\n", "model.fpn_channels"),
            ("[model]\npretrained = \"r18.pt\"\n", "model.pretrained"),
            ("[tasks]\nnms_iou = 0.0\n", "tasks.nms_iou"),
            ("[tasks]\nscore_threshold = 1.5\n", "tasks.score_threshold"),
            ("[tasks]\nmax_detections = 0\n", "tasks.max_detections"),
            ("[tasks]\nclassification = false\ndetection = false\nsegmentation = false\n", "tasks"),
        ] {
            let err = from_toml(text).unwrap_err();
            assert!(matches!(&err, JobConfigError::Invalid { key: k, .. } if k == key), "{text}: {err}");
        }
        let err = from_toml("[model]\nbackbone = \"vgg\"\n").unwrap_err();
        assert!(err.to_string().contains("model.backbone"), "{err}");
    }
}
