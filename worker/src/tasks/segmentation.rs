//! Semantic segmentation, FPN-fused (Panoptic-FPN style, simplified): P4 and P5 are upsampled
//! bilinearly to P3's size and summed with it, a 3x3 conv + GroupNorm + ReLU mixes them, a 1x1
//! conv gives class logits at stride 8, upsampled bilinearly to the input size. The loss is
//! pixel cross-entropy with ignore index 255.
use tch::{nn, Kind, Reduction, Tensor};

use crate::model::norm::group_norm;

/// Mask value excluded from the loss and the metrics.
pub const IGNORE_INDEX: i64 = 255;

/// The segmentation head.
#[derive(Debug)]
pub struct SegmentationHead {
    fuse: nn::Conv2D,
    fuse_norm: nn::GroupNorm,
    classifier: nn::Conv2D,
}

impl SegmentationHead {
    /// Creates `fuse`, `fuse_norm` and `classifier` under `path`.
    pub fn new(path: nn::Path<'_>, channels: i64, num_classes: i64) -> Self {
        let fuse_cfg = nn::ConvConfig { padding: 1, bias: false, ..Default::default() };
        SegmentationHead {
            fuse: nn::conv2d(&path / "fuse", channels, channels, 3, fuse_cfg),
            fuse_norm: group_norm(&path / "fuse_norm", channels),
            classifier: nn::conv2d(&path / "classifier", channels, num_classes, 1, Default::default()),
        }
    }

    /// Logits `[B,K,H,W]` at the input size `image_hw`.
    pub fn forward(&self, p: &[Tensor; 3], image_hw: (i64, i64)) -> Tensor {
        let size = p[0].size();
        let (h, w) = (size[2], size[3]);
        let fused = p[1..]
            .iter()
            .fold(p[0].shallow_clone(), |acc, x| acc + x.upsample_bilinear2d([h, w], false, None, None));
        let logits = fused.apply(&self.fuse).apply(&self.fuse_norm).relu().apply(&self.classifier);
        logits.upsample_bilinear2d([image_hw.0, image_hw.1], false, None, None)
    }
}

/// Summed pixel cross-entropy over valid pixels (not 255) of labelled images, divided by
/// `normaliser` (valid pixels, possibly summed over ranks; clamped to at least 1).
pub fn loss(logits: &Tensor, target: &Tensor, labelled: &Tensor, normaliser: f64) -> Tensor {
    let device = logits.device();
    let labelled = labelled.to_device(device).view([-1, 1, 1]);
    let target =
        target.to_device(device).where_self(&labelled, &Tensor::from(IGNORE_INDEX).to_device(device));
    let sum = logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, IGNORE_INDEX, 0.0);
    sum / normaliser.max(1.0)
}

/// Valid (labelled, not ignored) pixels of a batch.
pub fn valid_pixels(target: &Tensor, labelled: &Tensor) -> f64 {
    let valid = target.ne(IGNORE_INDEX).logical_and(&labelled.view([-1, 1, 1]));
    valid.sum(Kind::Int64).int64_value(&[]) as f64
}

/// Per-image argmax masks `H*W` (row-major) from logits `[B,K,H,W]`.
pub fn predict(logits: &Tensor) -> Vec<Vec<u8>> {
    let argmax = logits.argmax(1, false).to_device(tch::Device::Cpu).to_kind(Kind::Uint8);
    (0..argmax.size()[0]).map(|i| Vec::<u8>::try_from(argmax.get(i).view([-1])).expect("u8 mask")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_matches_pytorch_and_skips_ignored_and_unlabelled() {
        // import torch, torch.nn.functional as F
        // x = torch.arange(16.).reshape(1, 2, 2, 4).sin(); y = torch.tensor([[[0, 1, 255, 1], [1, 0, 0, 255]]])
        // print(F.cross_entropy(x, y, ignore_index=255, reduction='sum').item())  # 7.364809989929199
        let x = Tensor::arange(16, tch::kind::FLOAT_CPU).view([1, 2, 2, 4]).sin();
        let y = Tensor::from_slice(&[0i64, 1, 255, 1, 1, 0, 0, 255]).view([1, 2, 4]);
        let logits = Tensor::cat(&[&x, &x], 0);
        let target = Tensor::cat(&[&y, &y.zeros_like()], 0);
        let labelled = Tensor::from_slice(&[true, false]);
        assert_eq!(valid_pixels(&target, &labelled), 6.0);
        let l = loss(&logits, &target, &labelled, 6.0).double_value(&[]);
        assert!((l - SEG_REF / 6.0).abs() < 1e-6, "{l}");
    }

    const SEG_REF: f64 = 7.364_809_989_929_199;

    #[test]
    fn predict_is_the_argmax() {
        let logits = Tensor::from_slice(&[0f32, 1., 1., 0.]).view([1, 2, 1, 2]);
        assert_eq!(predict(&logits), vec![vec![1u8, 0]]);
    }
}
