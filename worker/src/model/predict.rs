//! Inference: per-image class, detections and mask from a batch of images.
use tch::Tensor;

use super::MultiTaskModel;
use crate::tasks::classification::{self, ClassPrediction};
use crate::tasks::decode::{decode, DecodeParams, Detection};
use crate::tasks::segmentation;
use crate::WorkerError;

/// Everything the model predicts for one image; a disabled task gives `None` / nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The image-level class (single-label) or per-class probabilities (multi-label).
    pub class: Option<ClassPrediction>,
    /// Detections after NMS, by descending score.
    pub detections: Vec<Detection>,
    /// Argmax class per pixel, row-major `H*W` at the input size.
    pub mask: Option<Vec<u8>>,
}

/// Runs the model in evaluation mode without gradients on `images` (`[B,3,H,W]`, on the
/// model's device) and turns its outputs into per-image predictions.
pub fn predict(model: &MultiTaskModel, images: &Tensor) -> Result<Vec<Prediction>, WorkerError> {
    let out = tch::no_grad(|| model.forward(images, false))?;
    let batch = images.size()[0] as usize;
    let t = model.tasks();
    let params = DecodeParams {
        score_threshold: t.score_threshold as f32,
        pre_nms_top_k: t.pre_nms_top_k as usize,
        nms_iou: t.nms_iou as f32,
        max_detections: t.max_detections as usize,
    };
    let mut classes = out.cls.as_ref().map(|l| classification::predict(l, t.multi_label).into_iter());
    let mut dets = out.det.as_ref().map(|d| decode(d, out.image_hw, &params).into_iter());
    let mut masks = out.seg.as_ref().map(|l| segmentation::predict(l).into_iter());
    Ok((0..batch)
        .map(|_| Prediction {
            class: classes.as_mut().and_then(Iterator::next),
            detections: dets.as_mut().and_then(Iterator::next).unwrap_or_default(),
            mask: masks.as_mut().and_then(Iterator::next),
        })
        .collect())
}
