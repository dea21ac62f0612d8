//! Layers whose forward pass returns LibTorch's errors instead of panicking (tch's `Module`
//! implementations call the panicking ops). The variables are tch's own (`nn::conv2d`,
//! `nn::linear`, `nn::group_norm`), so their names and initialisation are unchanged.
use tch::{nn, TchError, Tensor};

/// A 2-D convolution (zero padding, no dilation, one group).
#[derive(Debug)]
pub(crate) struct Conv2d {
    conv: nn::Conv2D,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    /// Creates `weight` (and `bias` if `cfg.bias`) under `path`, initialised as `cfg` says.
    pub(crate) fn new(path: nn::Path<'_>, c_in: i64, c_out: i64, kernel: i64, cfg: nn::ConvConfig) -> Self {
        let (stride, padding) = (cfg.stride, cfg.padding);
        Conv2d { conv: nn::conv2d(path, c_in, c_out, kernel, cfg), stride, padding }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.conv.ws, self.conv.bs.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }

    /// The kernel, `[out, in, k, k]`.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.conv.ws
    }
}

/// `x·Wᵀ + b`.
pub(crate) fn linear(layer: &nn::Linear, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_linear(&layer.ws, layer.bs.as_ref())
}

/// A GroupNorm built with tch's default config (eps 1e-5), as [`super::norm::group_norm`] makes
/// them.
pub(crate) fn group_norm(layer: &nn::GroupNorm, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_group_norm(layer.num_groups, layer.ws.as_ref(), layer.bs.as_ref(), 1e-5, true)
}
