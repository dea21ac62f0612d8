//! The FPN neck (Lin et al. 2017): 1x1 lateral convs on C3-C5, a top-down pathway adding
//! nearest-upsampled coarser maps, and a 3x3 output conv per level, giving P3/P4/P5 with the
//! same channel count.
use tch::{nn, Tensor};

/// Feature pyramid over the backbone's C3/C4/C5.
#[derive(Debug)]
pub struct Fpn {
    lateral: Vec<nn::Conv2D>,
    output: Vec<nn::Conv2D>,
}

impl Fpn {
    /// Creates `lateral.{0,1,2}` and `output.{0,1,2}` under `path`.
    pub fn new(path: nn::Path<'_>, in_channels: [i64; 3], channels: i64) -> Self {
        let init = nn::ConvConfig { bs_init: nn::Init::Const(0.), ..Default::default() };
        let lateral =
            (0..3).map(|i| nn::conv2d(&path / "lateral" / i, in_channels[i], channels, 1, init)).collect();
        let output = (0..3)
            .map(|i| {
                nn::conv2d(&path / "output" / i, channels, channels, 3, nn::ConvConfig { padding: 1, ..init })
            })
            .collect();
        Fpn { lateral, output }
    }

    /// P3, P4, P5 from C3, C4, C5.
    pub fn forward(&self, c: &[Tensor; 3]) -> [Tensor; 3] {
        let mut top = c[2].apply(&self.lateral[2]);
        let mut merged = vec![top.shallow_clone()];
        for i in (0..2).rev() {
            let lat = c[i].apply(&self.lateral[i]);
            let size = lat.size();
            top = lat + top.upsample_nearest2d([size[2], size[3]], None, None);
            merged.push(top.shallow_clone());
        }
        merged.reverse();
        let out: Vec<Tensor> = merged.iter().zip(&self.output).map(|(m, conv)| m.apply(conv)).collect();
        out.try_into().expect("three levels")
    }
}
