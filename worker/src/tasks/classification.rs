//! Image classification: global average pool on C5, then a linear layer. Single-label uses
//! softmax cross-entropy, multi-label a sigmoid binary cross-entropy per class.
use tch::{nn, Kind, Reduction, Tensor};

use crate::data::batch::ClassTarget;

/// The classification head.
#[derive(Debug)]
pub struct ClassificationHead {
    fc: nn::Linear,
}

impl ClassificationHead {
    /// Creates `fc.{weight,bias}` under `path`.
    pub fn new(path: nn::Path<'_>, in_channels: i64, num_classes: i64) -> Self {
        ClassificationHead { fc: nn::linear(&path / "fc", in_channels, num_classes, Default::default()) }
    }

    /// Logits `[B,C]` from C5 `[B,C5,h,w]`.
    pub fn forward(&self, c5: &Tensor) -> Tensor {
        c5.adaptive_avg_pool2d([1, 1]).flatten(1, -1).apply(&self.fc)
    }
}

/// Sum of the per-sample losses of labelled samples divided by `normaliser` (the labelled
/// count, possibly summed over ranks; clamped to at least 1). Unlabelled samples contribute
/// exactly zero, and the result stays connected to `logits` even when none is labelled.
pub fn loss(logits: &Tensor, target: &ClassTarget, labelled: &Tensor, normaliser: f64) -> Tensor {
    let device = logits.device();
    let mask = labelled.to_device(device).to_kind(Kind::Float);
    let per_sample = match target {
        ClassTarget::Single(t) => {
            // Unlabelled targets (-1) become class 0 so the op is valid; the mask zeroes them.
            let t = t.to_device(device).clamp_min(0);
            logits.log_softmax(-1, Kind::Float).neg().gather(1, &t.unsqueeze(1), false).squeeze_dim(1)
        }
        ClassTarget::Multi(t) => logits
            .binary_cross_entropy_with_logits::<Tensor>(&t.to_device(device), None, None, Reduction::None)
            .sum_dim_intlist(1, false, Kind::Float),
    };
    (per_sample * mask).sum(Kind::Float) / normaliser.max(1.0)
}

/// A prediction for one image.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassPrediction {
    /// The most probable class and its softmax probability.
    Single {
        /// Class index.
        index: usize,
        /// Its probability.
        score: f32,
    },
    /// Sigmoid probability of every class.
    Multi(Vec<f32>),
}

/// Per-image predictions from logits `[B,C]`.
pub fn predict(logits: &Tensor, multi_label: bool) -> Vec<ClassPrediction> {
    let logits = logits.to_device(tch::Device::Cpu).to_kind(Kind::Float);
    if multi_label {
        let probs = logits.sigmoid();
        (0..probs.size()[0])
            .map(|i| ClassPrediction::Multi(Vec::<f32>::try_from(probs.get(i)).unwrap()))
            .collect()
    } else {
        let (score, index) = logits.softmax(-1, Kind::Float).max_dim(1, false);
        (0..score.size()[0])
            .map(|i| ClassPrediction::Single {
                index: index.int64_value(&[i]) as usize,
                score: score.double_value(&[i]) as f32,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_label_loss_matches_pytorch_and_ignores_unlabelled() {
        // import torch, torch.nn.functional as F
        // x = torch.tensor([[1., 2., 0.5], [0.1, -1., 3.], [2., 2., 2.]]); y = torch.tensor([1, 2])
        // print(F.cross_entropy(x[:2], y, reduction='sum').item())  # 0.5351430177688599
        let logits = Tensor::from_slice2(&[[1f32, 2., 0.5], [0.1, -1., 3.], [2., 2., 2.]]);
        let target = ClassTarget::Single(Tensor::from_slice(&[1i64, 2, -1]));
        let labelled = Tensor::from_slice(&[true, true, false]);
        let l = loss(&logits, &target, &labelled, 2.0);
        assert!((l.double_value(&[]) - 0.535_143_017_768_859_9 / 2.0).abs() < 1e-6);
    }

    #[test]
    fn multi_label_loss_matches_pytorch() {
        // x = torch.tensor([[1., -2.], [0.3, 0.7]]); y = torch.tensor([[1., 0.], [0., 1.]])
        // print(F.binary_cross_entropy_with_logits(x[:1], y[:1], reduction='sum').item())
        // 0.44018977880477905
        let logits = Tensor::from_slice2(&[[1f32, -2.], [0.3, 0.7]]);
        let target = ClassTarget::Multi(Tensor::from_slice2(&[[1f32, 0.], [0., 1.]]));
        let labelled = Tensor::from_slice(&[true, false]);
        let l = loss(&logits, &target, &labelled, 1.0);
        assert!((l.double_value(&[]) - 0.440_189_778_804_779_05).abs() < 1e-6);
    }

    #[test]
    fn predictions_pick_the_argmax() {
        let logits = Tensor::from_slice2(&[[0f32, 3., 0.], [5., 0., 0.]]);
        let p = predict(&logits, false);
        assert!(matches!(p[0], ClassPrediction::Single { index: 1, score } if score > 0.9));
        assert!(matches!(p[1], ClassPrediction::Single { index: 0, .. }));
        assert!(matches!(&predict(&logits, true)[0], ClassPrediction::Multi(v) if v.len() == 3));
    }
}
