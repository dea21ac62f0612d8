//! Semantic segmentation, FPN-fused (Panoptic-FPN style, simplified): P4 and P5 are upsampled
//! bilinearly to P3's size and summed with it, a 3x3 conv + GroupNorm + ReLU mixes them, a 1x1
//! conv gives class logits at stride 8, upsampled bilinearly to the input size. The loss is
//! pixel cross-entropy with ignore index 255.
use tch::{nn, Kind, Reduction, TchError, Tensor};

use crate::model::layers::{group_norm as apply_group_norm, Conv2d};
use crate::model::norm::group_norm;
use crate::{At, WorkerError};

/// Mask value excluded from the loss and the metrics.
pub(crate) const IGNORE_INDEX: i64 = 255;

/// The segmentation head.
#[derive(Debug)]
pub(crate) struct SegmentationHead {
    fuse: Conv2d,
    fuse_norm: nn::GroupNorm,
    classifier: Conv2d,
}

impl SegmentationHead {
    /// Creates `fuse`, `fuse_norm` and `classifier` under `path`.
    pub(crate) fn new(path: nn::Path<'_>, channels: i64, num_classes: i64) -> Self {
        let fuse_cfg = nn::ConvConfig { padding: 1, bias: false, ..Default::default() };
        SegmentationHead {
            fuse: Conv2d::new(&path / "fuse", channels, channels, 3, fuse_cfg),
            fuse_norm: group_norm(&path / "fuse_norm", channels),
            classifier: Conv2d::new(&path / "classifier", channels, num_classes, 1, Default::default()),
        }
    }

    /// Logits `[B,K,H,W]` at the input size `image_hw`.
    pub(crate) fn forward(&self, p: &[Tensor; 3], image_hw: (i64, i64)) -> Result<Tensor, WorkerError> {
        self.forward_unnamed(p, image_hw).at("segmentation head")
    }

    fn forward_unnamed(&self, p: &[Tensor; 3], image_hw: (i64, i64)) -> Result<Tensor, TchError> {
        let (_, _, h, w) = p[0].size4()?;
        let fused = p[1..].iter().try_fold(p[0].shallow_clone(), |acc, x| {
            acc.f_add(&x.f_upsample_bilinear2d([h, w], false, None, None)?)
        })?;
        let mixed = apply_group_norm(&self.fuse_norm, &self.fuse.forward(&fused)?)?.f_relu()?;
        let logits = self.classifier.forward(&mixed)?;
        logits.f_upsample_bilinear2d([image_hw.0, image_hw.1], false, None, None)
    }
}

/// Summed pixel cross-entropy over valid pixels (not 255) of labelled images, divided by
/// `normaliser` (valid pixels, possibly summed over ranks, at least 1: a 0-dim tensor). A mask
/// value that is neither a class of the head nor 255 is an error naming the loss.
pub(crate) fn loss(
    logits: &Tensor,
    target: &Tensor,
    labelled: &Tensor,
    normaliser: &Tensor,
) -> Result<Tensor, WorkerError> {
    loss_unnamed(logits, target, labelled, normaliser).at("segmentation loss")
}

fn loss_unnamed(
    logits: &Tensor,
    target: &Tensor,
    labelled: &Tensor,
    normaliser: &Tensor,
) -> Result<Tensor, TchError> {
    let unlabelled = labelled.f_logical_not()?.f_view([-1, 1, 1])?;
    let target = target.f_masked_fill(&unlabelled, IGNORE_INDEX)?;
    let sum = logits.f_cross_entropy_loss::<Tensor>(&target, None, Reduction::Sum, IGNORE_INDEX, 0.0)?;
    sum.f_div(normaliser)
}

/// Valid (labelled, not ignored) pixels of a batch: a 0-dim f64 tensor on the batch's device.
pub(crate) fn valid_pixels(target: &Tensor, labelled: &Tensor) -> Result<Tensor, TchError> {
    let valid = target.f_ne(IGNORE_INDEX)?.f_logical_and(&labelled.f_view([-1, 1, 1])?)?;
    valid.f_sum(Kind::Double)
}

/// Per-image argmax masks `H*W` (row-major) from logits `[B,K,H,W]`.
pub(crate) fn predict(logits: &Tensor) -> Result<Vec<Vec<u8>>, WorkerError> {
    let masks = || -> Result<Vec<Vec<u8>>, TchError> {
        let argmax = logits.f_argmax(1, false)?.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Uint8)?;
        let (batch, h, w) = argmax.size3()?;
        let flat = Vec::<u8>::try_from(argmax.f_contiguous()?.f_view([-1])?)?;
        let pixels = (h * w) as usize;
        Ok((0..batch as usize).map(|i| flat[i * pixels..(i + 1) * pixels].to_vec()).collect())
    };
    masks().at("segmentation prediction")
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
        assert_eq!(valid_pixels(&target, &labelled).unwrap().double_value(&[]), 6.0);
        let l = loss(&logits, &target, &labelled, &Tensor::from(6.0f32)).unwrap().double_value(&[]);
        assert!((l - SEG_REF / 6.0).abs() < 1e-6, "{l}");
    }

    const SEG_REF: f64 = 7.364_809_989_929_199;

    #[test]
    fn predict_is_the_argmax() {
        let logits = Tensor::from_slice(&[0f32, 1., 1., 0.]).view([1, 2, 1, 2]);
        assert_eq!(predict(&logits).unwrap(), vec![vec![1u8, 0]]);
    }
}
