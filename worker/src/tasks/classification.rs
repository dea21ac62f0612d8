//! Image classification: global average pool on C5, then a linear layer. Single-label uses
//! softmax cross-entropy, multi-label a sigmoid binary cross-entropy per class.
use tch::{nn, Kind, Reduction, TchError, Tensor};

use crate::data::batch::ClassTarget;
use crate::model::layers::linear;
use crate::{At, WorkerError};

/// The classification head.
#[derive(Debug)]
pub(crate) struct ClassificationHead {
    fc: nn::Linear,
}

impl ClassificationHead {
    /// Creates `fc.{weight,bias}` under `path`.
    pub(crate) fn new(path: nn::Path<'_>, in_channels: i64, num_classes: i64) -> Self {
        ClassificationHead { fc: nn::linear(&path / "fc", in_channels, num_classes, Default::default()) }
    }

    /// Logits `[B,C]` from C5 `[B,C5,h,w]`.
    pub(crate) fn forward(&self, c5: &Tensor) -> Result<Tensor, WorkerError> {
        let pooled = || c5.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1);
        pooled().and_then(|x| linear(&self.fc, &x)).at("classification head")
    }
}

/// Sum of the per-sample losses of labelled samples divided by `normaliser` (the labelled
/// count, possibly summed over ranks, at least 1: a 0-dim tensor). Unlabelled samples contribute
/// exactly zero, and the result stays connected to `logits` even when none is labelled.
/// Targets outside the head's classes are an error naming the loss.
pub(crate) fn loss(
    logits: &Tensor,
    target: &ClassTarget,
    labelled: &Tensor,
    normaliser: &Tensor,
) -> Result<Tensor, WorkerError> {
    loss_unnamed(logits, target, labelled, normaliser).at("classification loss")
}

fn loss_unnamed(
    logits: &Tensor,
    target: &ClassTarget,
    labelled: &Tensor,
    normaliser: &Tensor,
) -> Result<Tensor, TchError> {
    let mask = labelled.f_to_kind(Kind::Float)?;
    let per_sample = match target {
        ClassTarget::Single(t) => {
            // Unlabelled targets (-1) become class 0 so the op is valid; the mask zeroes them.
            let t = t.f_clamp_min(0)?;
            logits
                .f_log_softmax(-1, Kind::Float)?
                .f_neg()?
                .f_gather(1, &t.f_unsqueeze(1)?, false)?
                .f_squeeze_dim(1)?
        }
        ClassTarget::Multi(t) => logits
            .f_binary_cross_entropy_with_logits::<Tensor>(t, None, None, Reduction::None)?
            .f_sum_dim_intlist(1, false, Kind::Float)?,
    };
    per_sample.f_mul(&mask)?.f_sum(Kind::Float)?.f_div(normaliser)
}

/// A prediction for one image.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClassPrediction {
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
pub(crate) fn predict(logits: &Tensor, multi_label: bool) -> Result<Vec<ClassPrediction>, WorkerError> {
    predict_unnamed(logits, multi_label).at("classification prediction")
}

fn predict_unnamed(logits: &Tensor, multi_label: bool) -> Result<Vec<ClassPrediction>, TchError> {
    let logits = logits.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?;
    let (batch, classes) = logits.size2()?;
    if multi_label {
        let probs = Vec::<f32>::try_from(logits.f_sigmoid()?.f_contiguous()?.f_view([-1])?)?;
        Ok(probs
            .chunks(classes.max(1) as usize)
            .take(batch as usize)
            .map(|p| ClassPrediction::Multi(p.to_vec()))
            .collect())
    } else {
        let (score, index) = logits.f_softmax(-1, Kind::Float)?.f_max_dim(1, false)?;
        let (score, index) = (Vec::<f32>::try_from(&score)?, Vec::<i64>::try_from(&index)?);
        Ok(score
            .into_iter()
            .zip(index)
            .map(|(score, index)| ClassPrediction::Single { index: index as usize, score })
            .collect())
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
        let l = loss(&logits, &target, &labelled, &Tensor::from(2.0f32)).unwrap();
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
        let l = loss(&logits, &target, &labelled, &Tensor::from(1.0f32)).unwrap();
        assert!((l.double_value(&[]) - 0.440_189_778_804_779_05).abs() < 1e-6);
    }

    #[test]
    fn predictions_pick_the_argmax() {
        let logits = Tensor::from_slice2(&[[0f32, 3., 0.], [5., 0., 0.]]);
        let p = predict(&logits, false).unwrap();
        assert!(matches!(p[0], ClassPrediction::Single { index: 1, score } if score > 0.9));
        assert!(matches!(p[1], ClassPrediction::Single { index: 0, .. }));
        assert!(matches!(&predict(&logits, true).unwrap()[0], ClassPrediction::Multi(v) if v.len() == 3));
    }
}
