//! The batch contract between the data loader and the model (placeholder; the data branch's
//! version replaces this file at merge).
use tch::Tensor;

/// One ground-truth box in pixel coordinates of the (augmented) network input, corners (x1,y1,x2,y2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtBox {
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
    /// 0-based contiguous category.
    pub category: u32,
    /// A crowd region: not a training target.
    pub iscrowd: bool,
}

/// Image-level class targets.
#[derive(Debug)]
pub enum ClassTarget {
    /// `[B]` i64, -1 = unlabelled.
    Single(Tensor),
    /// `[B,C]` f32 0/1.
    Multi(Tensor),
}

/// A batch of samples with per-task labels and per-sample "labelled" flags.
#[derive(Debug)]
pub struct Batch {
    /// Sample ids.
    pub ids: Vec<u64>,
    /// `[B,3,H,W]` f32, normalised with ImageNet mean/std, CPU.
    pub images: Tensor,
    /// Class targets.
    pub class_target: ClassTarget,
    /// `[B]` bool: sample has a class label.
    pub class_labelled: Tensor,
    /// Boxes per image.
    pub boxes: Vec<Vec<GtBox>>,
    /// Detection labels present (a labelled image may have 0 boxes).
    pub boxes_labelled: Vec<bool>,
    /// `[B,H,W]` i64 with 255 = ignore (all 255 where unlabelled).
    pub mask_target: Tensor,
    /// `[B]` bool.
    pub mask_labelled: Tensor,
}

/// What a dataset says about its label spaces.
#[derive(Debug, Clone)]
pub struct DatasetInfo {
    /// Classification classes.
    pub class_names: Vec<String>,
    /// Classification is multi-label.
    pub multi_label: bool,
    /// Original (COCO) id and name; index = contiguous category.
    pub det_categories: Vec<(u64, String)>,
    /// Index = class id in masks; 0 is background.
    pub seg_classes: Vec<String>,
}
