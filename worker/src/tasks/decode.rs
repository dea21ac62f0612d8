//! Turning FCOS outputs into boxes: score = sqrt(sigmoid(class) * sigmoid(centerness)) as in
//! torchvision's FCOS, a score threshold and top-k per level, ltrb → corners clipped to the
//! image, then class-wise greedy NMS (on the CPU, in Rust) and a cap per image.
use tch::{Device, Kind, TchError, Tensor};

use super::detection::DetOutput;
use super::fcos_targets::STRIDES;
use crate::{At, WorkerError};

/// One detected object in input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Detection {
    /// Left edge.
    pub x1: f32,
    /// Top edge.
    pub y1: f32,
    /// Right edge.
    pub x2: f32,
    /// Bottom edge.
    pub y2: f32,
    /// Confidence in (0, 1).
    pub score: f32,
    /// Contiguous category index.
    pub category: u32,
}

impl Detection {
    fn area(&self) -> f32 {
        (self.x2 - self.x1).max(0.0) * (self.y2 - self.y1).max(0.0)
    }

    /// Intersection over union with `other`.
    pub(crate) fn iou(&self, other: &Detection) -> f32 {
        let w = (self.x2.min(other.x2) - self.x1.max(other.x1)).max(0.0);
        let h = (self.y2.min(other.y2) - self.y1.max(other.y1)).max(0.0);
        let inter = w * h;
        let union = self.area() + other.area() - inter;
        if union > 0.0 {
            inter / union
        } else {
            0.0
        }
    }
}

/// Decoding parameters (from `[tasks]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeParams {
    /// Minimum score.
    pub score_threshold: f32,
    /// Candidates kept per level before NMS.
    pub pre_nms_top_k: usize,
    /// NMS IoU threshold.
    pub nms_iou: f32,
    /// Detections kept per image.
    pub max_detections: usize,
}

/// Class-wise greedy NMS: highest score first, a box is dropped when it overlaps a kept box of
/// the same category by more than `iou`. Returns the kept boxes by descending score.
pub(crate) fn nms(mut dets: Vec<Detection>, iou: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in dets {
        if kept.iter().all(|k| k.category != d.category || k.iou(&d) <= iou) {
            kept.push(d);
        }
    }
    kept
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, TchError> {
    Vec::<f32>::try_from(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)
}

/// Detections per image for an input of `image_hw` pixels.
pub(crate) fn decode(
    out: &DetOutput,
    image_hw: (i64, i64),
    params: &DecodeParams,
) -> Result<Vec<Vec<Detection>>, WorkerError> {
    decode_unnamed(out, image_hw, params).at("detection decoding")
}

fn decode_unnamed(
    out: &DetOutput,
    image_hw: (i64, i64),
    params: &DecodeParams,
) -> Result<Vec<Vec<Detection>>, TchError> {
    let batch = out.cls_logits.first().map_or(Ok(0), |t| t.size4().map(|s| s.0))?;
    let (h_img, w_img) = (image_hw.0 as f32, image_hw.1 as f32);
    let mut per_image = vec![Vec::new(); batch as usize];
    for (level, (cls, &stride)) in out.cls_logits.iter().zip(&STRIDES).enumerate() {
        let (_, _, h, w) = cls.size4()?;
        let scores = cls.f_sigmoid()?.f_mul(&out.centerness[level].f_sigmoid()?)?.f_sqrt()?;
        let stride = stride as f32;
        for (i, dets) in per_image.iter_mut().enumerate() {
            let s = to_vec(&scores.f_get(i as i64)?)?;
            let ltrb = to_vec(&out.ltrb[level].f_get(i as i64)?)?;
            let mut cand: Vec<(f32, usize)> = s
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > params.score_threshold)
                .map(|(k, &v)| (v, k))
                .collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0));
            cand.truncate(params.pre_nms_top_k);
            let hw = (h * w) as usize;
            for (score, k) in cand {
                let (category, loc) = (k / hw, k % hw);
                let (cx, cy) = (
                    (loc % w as usize) as f32 * stride + stride / 2.0,
                    (loc / w as usize) as f32 * stride + stride / 2.0,
                );
                let d = |j: usize| ltrb[j * hw + loc];
                dets.push(Detection {
                    x1: (cx - d(0)).clamp(0.0, w_img),
                    y1: (cy - d(1)).clamp(0.0, h_img),
                    x2: (cx + d(2)).clamp(0.0, w_img),
                    y2: (cy + d(3)).clamp(0.0, h_img),
                    score,
                    category: category as u32,
                });
            }
        }
    }
    Ok(per_image
        .into_iter()
        .map(|dets| {
            let mut kept = nms(dets, params.nms_iou);
            kept.truncate(params.max_detections);
            kept
        })
        .collect())
}
