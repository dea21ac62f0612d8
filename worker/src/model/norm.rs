//! Normalisation layers selectable from config: BatchNorm, SyncBatchNorm, GroupNorm and frozen
//! BatchNorm, all keeping torchvision's parameter names (`weight`, `bias`, `running_mean`,
//! `running_var`), so a checkpoint trained with `sync_batch` loads into a `batch` model and back.
use std::sync::Arc;

use mtl_job::NormKind;
use tch::{nn, Tensor};

use super::sync_batch_norm::{SyncBatchNorm, SyncContext};
use crate::WorkerError;

/// The epsilon added to the variance by BatchNorm and GroupNorm (PyTorch's default).
pub(crate) const EPS: f64 = 1e-5;
/// BatchNorm's running-statistics momentum (PyTorch's default).
pub(crate) const MOMENTUM: f64 = 0.1;

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

/// How one model builds its norm layers: the configured kind and, for `sync_batch`, the
/// context every SyncBatchNorm layer of the model shares (the Trainer attaches the job's
/// collective to it).
#[derive(Debug)]
pub(crate) enum NormLayers {
    Batch,
    SyncBatch(Arc<SyncContext>),
    Group,
    FrozenBatch,
}

impl NormLayers {
    /// Layers of `kind`; a new (not yet attached) context for `sync_batch`.
    pub(crate) fn new(kind: NormKind) -> Self {
        match kind {
            NormKind::Batch => Self::Batch,
            NormKind::SyncBatch => Self::SyncBatch(Arc::new(SyncContext::default())),
            NormKind::Group => Self::Group,
            NormKind::FrozenBatch => Self::FrozenBatch,
        }
    }

    /// The context the SyncBatchNorm layers reduce through (`None` for other kinds).
    pub(crate) fn sync_context(&self) -> Option<&Arc<SyncContext>> {
        match self {
            Self::SyncBatch(sync) => Some(sync),
            _ => None,
        }
    }

    /// Whether a training forward pass changes buffers (BatchNorm's running statistics), which
    /// data-parallel ranks must then keep identical.
    pub(crate) fn updates_buffers(&self) -> bool {
        matches!(self, Self::Batch | Self::SyncBatch(_))
    }
}

/// BatchNorm's variables, as `nn::batch_norm2d` names them.
#[derive(Debug)]
pub(crate) struct BatchNormVars {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) running_mean: Tensor,
    pub(crate) running_var: Tensor,
}

impl BatchNormVars {
    fn new(path: nn::Path<'_>, channels: i64, gamma: f64) -> Self {
        Self {
            weight: path.var("weight", &[channels], nn::Init::Const(gamma)),
            bias: path.var("bias", &[channels], nn::Init::Const(0.0)),
            running_mean: path.zeros_no_train("running_mean", &[channels]),
            running_var: path.ones_no_train("running_var", &[channels]),
        }
    }

    /// BatchNorm of `x`: batch statistics (updating the running ones) when `train`, the running
    /// statistics otherwise.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, WorkerError> {
        Ok(x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            MOMENTUM,
            EPS,
            true,
        )?)
    }
}

/// One normalisation layer of the backbone.
#[derive(Debug)]
pub(crate) enum Norm {
    Batch(BatchNormVars),
    /// BatchNorm with statistics over the batches of all ranks (see [`super::sync_batch_norm`]).
    SyncBatch(SyncBatchNorm),
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
    pub(crate) fn new(path: nn::Path<'_>, layers: &NormLayers, channels: i64) -> Self {
        Self::with_gamma(path, layers, channels, 1.0)
    }

    /// Like [`Norm::new`] with the trainable scale starting at `gamma`. The last norm of each
    /// residual branch starts at 0 (torchvision's `zero_init_residual`): every block starts as
    /// the identity, which keeps early gradients small and training stable.
    pub(crate) fn with_gamma(path: nn::Path<'_>, layers: &NormLayers, channels: i64, gamma: f64) -> Self {
        match layers {
            NormLayers::Batch => Norm::Batch(BatchNormVars::new(path, channels, gamma)),
            NormLayers::SyncBatch(sync) => Norm::SyncBatch(SyncBatchNorm::new(
                BatchNormVars::new(path, channels, gamma),
                Arc::clone(sync),
            )),
            NormLayers::Group => Norm::Group(group_norm_init(path, channels, gamma)),
            NormLayers::FrozenBatch => Norm::Frozen {
                weight: path.ones_no_train("weight", &[channels]),
                bias: path.zeros_no_train("bias", &[channels]),
                running_mean: path.zeros_no_train("running_mean", &[channels]),
                running_var: path.ones_no_train("running_var", &[channels]),
            },
        }
    }

    /// Normalises `x` (`[B,C,H,W]`); `train` only matters for BatchNorm and SyncBatchNorm.
    pub(crate) fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, WorkerError> {
        match self {
            Norm::Batch(bn) => bn.forward(x, train),
            Norm::SyncBatch(bn) => bn.forward(x, train),
            Norm::Group(gn) => {
                Ok(x.f_group_norm(gn.num_groups, gn.ws.as_ref(), gn.bs.as_ref(), EPS, true)?)
            }
            Norm::Frozen { weight, bias, running_mean, running_var } => {
                let scale = weight.f_mul(&running_var.f_add_scalar(EPS)?.f_rsqrt()?)?;
                let shift = bias.f_sub(&running_mean.f_mul(&scale)?)?;
                Ok(x.f_mul(&scale.f_view([1, -1, 1, 1])?)?.f_add(&shift.f_view([1, -1, 1, 1])?)?)
            }
        }
    }
}
