//! Normalisation layers selectable from config: BatchNorm, GroupNorm and frozen BatchNorm, all
//! keeping torchvision's parameter names (`weight`, `bias`, `running_mean`, `running_var`).
use mtl_job::NormKind;
use tch::{nn, Tensor};

/// GroupNorm's group count for `channels`: 32 (Detectron's default) or the largest power of two
/// below it that divides `channels`.
pub(crate) fn group_count(channels: i64) -> i64 {
    let mut groups = 32;
    while groups > 1 && channels % groups != 0 {
        groups /= 2;
    }
    groups
}

/// A GroupNorm with [`group_count`] groups.
pub(crate) fn group_norm(path: nn::Path<'_>, channels: i64) -> nn::GroupNorm {
    nn::group_norm(path, group_count(channels), channels, Default::default())
}

/// A GroupNorm whose scale starts at `gamma`.
fn group_norm_init(path: nn::Path<'_>, channels: i64, gamma: f64) -> nn::GroupNorm {
    let cfg = nn::GroupNormConfig { ws_init: nn::Init::Const(gamma), ..Default::default() };
    nn::group_norm(path, group_count(channels), channels, cfg)
}

/// One normalisation layer of the backbone.
#[derive(Debug)]
pub(crate) enum Norm {
    Batch(nn::BatchNorm),
    Group(nn::GroupNorm),
    /// `y = x * scale + shift` from buffers that are loaded but never trained nor updated.
    Frozen {
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
    },
}

impl Norm {
    /// Creates the layer's variables under `path`.
    pub(crate) fn new(path: nn::Path<'_>, kind: NormKind, channels: i64) -> Self {
        Self::with_gamma(path, kind, channels, 1.0)
    }

    /// Like [`Norm::new`] with the trainable scale starting at `gamma`. The last norm of each
    /// residual branch starts at 0 (torchvision's `zero_init_residual`): every block starts as
    /// the identity, which keeps early gradients small and training stable.
    pub(crate) fn with_gamma(path: nn::Path<'_>, kind: NormKind, channels: i64, gamma: f64) -> Self {
        match kind {
            NormKind::Batch => Norm::Batch(nn::batch_norm2d(
                path,
                channels,
                nn::BatchNormConfig { ws_init: nn::Init::Const(gamma), ..Default::default() },
            )),
            NormKind::Group => Norm::Group(group_norm_init(path, channels, gamma)),
            NormKind::FrozenBatch => Norm::Frozen {
                weight: path.ones_no_train("weight", &[channels]),
                bias: path.zeros_no_train("bias", &[channels]),
                running_mean: path.zeros_no_train("running_mean", &[channels]),
                running_var: path.ones_no_train("running_var", &[channels]),
            },
        }
    }

    /// Normalises `x` (`[B,C,H,W]`); `train` only matters for BatchNorm.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Batch(bn) => nn::ModuleT::forward_t(bn, x, train),
            Norm::Group(gn) => nn::Module::forward(gn, x),
            Norm::Frozen { weight, bias, running_mean, running_var } => {
                let scale = weight * (running_var + 1e-5).rsqrt();
                let shift = bias - running_mean * &scale;
                x * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])
            }
        }
    }
}
