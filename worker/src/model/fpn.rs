//! The FPN neck (Lin et al. 2017): 1x1 lateral convs on C3-C5, a top-down pathway adding
//! nearest-upsampled coarser maps, and a 3x3 output conv per level, giving P3/P4/P5 with the
//! same channel count.
use tch::{nn, Tensor};

use super::layers::Conv2d;
use crate::{At, WorkerError};

/// Feature pyramid over the backbone's C3/C4/C5.
#[derive(Debug)]
pub(crate) struct Fpn {
    lateral: Vec<Conv2d>,
    output: Vec<Conv2d>,
}

impl Fpn {
    /// Creates `lateral.{0,1,2}` and `output.{0,1,2}` under `path`.
    pub(crate) fn new(path: nn::Path<'_>, in_channels: [i64; 3], channels: i64) -> Self {
        let init = nn::ConvConfig { bs_init: nn::Init::Const(0.), ..Default::default() };
        let lateral =
            (0..3).map(|i| Conv2d::new(&path / "lateral" / i, in_channels[i], channels, 1, init)).collect();
        let output = (0..3)
            .map(|i| {
                Conv2d::new(
                    &path / "output" / i,
                    channels,
                    channels,
                    3,
                    nn::ConvConfig { padding: 1, ..init },
                )
            })
            .collect();
        Fpn { lateral, output }
    }

    /// P3, P4, P5 from C3, C4, C5.
    pub(crate) fn forward(&self, c: &[Tensor; 3]) -> Result<[Tensor; 3], WorkerError> {
        self.forward_unnamed(c).at("neck (FPN)")
    }

    fn forward_unnamed(&self, c: &[Tensor; 3]) -> Result<[Tensor; 3], WorkerError> {
        let mut top = self.lateral[2].forward(&c[2])?;
        let mut merged = vec![top.shallow_clone()];
        for i in (0..2).rev() {
            let lat = self.lateral[i].forward(&c[i])?;
            let size = lat.size();
            top = lat.f_add(&top.f_upsample_nearest2d([size[2], size[3]], None, None)?)?;
            merged.push(top.shallow_clone());
        }
        merged.reverse();
        let [p3, p4, p5] = [0, 1, 2].map(|i| self.output[i].forward(&merged[i]));
        Ok([p3?, p4?, p5?])
    }
}
