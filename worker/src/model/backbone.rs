//! ResNet 18/34/50 backbones with torchvision's parameter names (`conv1.weight`, `bn1.*`,
//! `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`, ...) so a torchvision state_dict
//! converted to safetensors loads into them, plus a `tiny` variant (one BasicBlock per stage)
//! for CPU tests. The forward pass returns the C3/C4/C5 taps at strides 8/16/32.
use std::path::Path;

use mtl_job::{BackboneKind, NormKind};
use tch::{nn, Tensor};

use super::layers::Conv2d;
use super::norm::{Norm, NormLayers};
use crate::{At, WorkerError};

/// Residual block type and blocks per stage of a backbone.
fn layout(kind: BackboneKind) -> (bool, [usize; 4]) {
    match kind {
        BackboneKind::Tiny => (false, [1, 1, 1, 1]),
        BackboneKind::Resnet18 => (false, [2, 2, 2, 2]),
        BackboneKind::Resnet34 => (false, [3, 4, 6, 3]),
        BackboneKind::Resnet50 => (true, [3, 4, 6, 3]),
    }
}

/// A bias-free convolution initialised as torchvision does (Kaiming normal, fan-out, ReLU).
fn conv(path: nn::Path<'_>, c_in: i64, c_out: i64, k: i64, stride: i64) -> Conv2d {
    let cfg = nn::ConvConfig {
        stride,
        padding: k / 2,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    Conv2d::new(path, c_in, c_out, k, cfg)
}

/// One residual block: BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1).
#[derive(Debug)]
struct Block {
    /// `backbone layerS.B`, for errors.
    name: String,
    convs: Vec<(Conv2d, Norm)>,
    downsample: Option<(Conv2d, Norm)>,
}

impl Block {
    fn new(
        p: nn::Path<'_>,
        name: String,
        norm: &NormLayers,
        bottleneck: bool,
        c_in: i64,
        planes: i64,
        stride: i64,
    ) -> Self {
        let (c_out, shapes): (i64, Vec<(i64, i64, i64, i64)>) = if bottleneck {
            (planes * 4, vec![(c_in, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)])
        } else {
            (planes, vec![(c_in, planes, 3, stride), (planes, planes, 3, 1)])
        };
        let last = shapes.len();
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                let n = i + 1;
                let gamma = if n == last { 0.0 } else { 1.0 };
                (
                    conv(&p / format!("conv{n}"), ci, co, k, s),
                    Norm::with_gamma(&p / format!("bn{n}"), norm, co, gamma),
                )
            })
            .collect();
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let d = &p / "downsample";
            (conv(&d / "0", c_in, c_out, 1, stride), Norm::new(&d / "1", norm, c_out))
        });
        Block { name, convs, downsample }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, WorkerError> {
        self.forward_unnamed(x, train).at(&self.name)
    }

    fn forward_unnamed(&self, x: &Tensor, train: bool) -> Result<Tensor, WorkerError> {
        let last = self.convs.len() - 1;
        let mut y = x.shallow_clone();
        for (i, (c, n)) in self.convs.iter().enumerate() {
            let conv_out = c.forward(&y)?;
            y = n.forward(&conv_out, train)?;
            if i < last {
                y = y.f_relu()?;
            }
        }
        let identity = match &self.downsample {
            Some((c, n)) => {
                let conv_out = c.forward(x)?;
                n.forward(&conv_out, train)?
            }
            None => x.shallow_clone(),
        };
        Ok(y.f_add(&identity)?.f_relu()?)
    }
}

/// A ResNet without its classifier, returning features at strides 8, 16 and 32.
#[derive(Debug)]
pub(crate) struct Backbone {
    conv1: Conv2d,
    bn1: Norm,
    stages: Vec<Vec<Block>>,
    out_channels: [i64; 3],
    norms: NormLayers,
}

impl Backbone {
    /// Builds the backbone's variables under `path` (torchvision names relative to it).
    pub(crate) fn new(path: nn::Path<'_>, kind: BackboneKind, width: i64, norm: NormKind) -> Self {
        let (bottleneck, blocks) = layout(kind);
        let expansion = if bottleneck { 4 } else { 1 };
        let norms = NormLayers::new(norm);
        let conv1 = conv(&path / "conv1", 3, width, 7, 2);
        let bn1 = Norm::new(&path / "bn1", &norms, width);
        let mut c_in = width;
        let mut stages = Vec::new();
        for (i, &n) in blocks.iter().enumerate() {
            let planes = width << i;
            let stage_path = &path / format!("layer{}", i + 1);
            let stage = (0..n)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let name = format!("backbone layer{}.{j}", i + 1);
                    let block = Block::new(&stage_path / j, name, &norms, bottleneck, c_in, planes, stride);
                    c_in = planes * expansion;
                    block
                })
                .collect();
            stages.push(stage);
        }
        let out_channels = [2 * width * expansion, 4 * width * expansion, 8 * width * expansion];
        Backbone { conv1, bn1, stages, out_channels, norms }
    }

    /// How the backbone's norm layers were built (their kind, SyncBatchNorm's shared context).
    pub(crate) fn norms(&self) -> &NormLayers {
        &self.norms
    }

    /// Channels of C3, C4, C5.
    pub(crate) fn out_channels(&self) -> [i64; 3] {
        self.out_channels
    }

    /// C3, C4, C5 for `images` (`[B,3,H,W]`).
    pub(crate) fn forward(&self, images: &Tensor, train: bool) -> Result<[Tensor; 3], WorkerError> {
        let stem = || -> Result<Tensor, WorkerError> {
            let conv_out = self.conv1.forward(images)?;
            let x = self.bn1.forward(&conv_out, train)?;
            Ok(x.f_relu()?.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?)
        };
        let mut x = stem().at("backbone stem")?;
        let mut taps = Vec::with_capacity(3);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                x = block.forward(&x, train)?;
            }
            if i > 0 {
                taps.push(x.shallow_clone());
            }
        }
        let [c3, c4, c5]: [Tensor; 3] = taps.try_into().expect("three stages after the first");
        Ok([c3, c4, c5])
    }

    /// The kernel of the last stage's shortcut convolution (`layer4.0.downsample.0.weight`):
    /// the last convolution whose gradient every consumer of C5 reaches from the first step
    /// (see [`super::MultiTaskModel::gradnorm_layer`]).
    pub(crate) fn last_stage_shortcut(&self) -> &Tensor {
        let first = &self.stages[3][0];
        first.downsample.as_ref().expect("the last stage starts with a stride-2 block").0.weight()
    }
}

/// Spatial sizes of C3/C4/C5 (and P3/P4/P5) for an `h`x`w` input: each stride-2 layer maps n to
/// ceil(n/2) (7x7/2 pad 3, 3x3/2 pad 1, 1x1/2 pad 0 all do).
pub(crate) fn feature_sizes(h: i64, w: i64) -> [(i64, i64); 3] {
    let half = |n: i64| (n + 1) / 2;
    let mut size = (h, w);
    let mut out = [(0, 0); 3];
    for level in 0..5 {
        size = (half(size.0), half(size.1));
        if level >= 2 {
            out[level - 2] = size;
        }
    }
    out
}

/// Loads a backbone-only safetensors file (torchvision names, e.g. `layer1.0.conv1.weight`) into
/// the variables of `vs` under `prefix.` (e.g. `backbone.`). Keys in the file that the model
/// lacks (`fc.*`, `num_batches_tracked`, BatchNorm statistics under GroupNorm) are ignored; a
/// variable missing from the file or with another shape is an error.
pub(crate) fn load_backbone(vs: &nn::VarStore, prefix: &str, path: &Path) -> Result<(), WorkerError> {
    let err = |name: &str, message: String| WorkerError::Weights {
        path: path.to_owned(),
        name: name.to_string(),
        message,
    };
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(path).map_err(|e| err("", e.to_string()))?.into_iter().collect();
    let wanted = format!("{prefix}.");
    for (name, mut var) in vs.variables() {
        let Some(key) = name.strip_prefix(&wanted) else { continue };
        let src = tensors.get(key).ok_or_else(|| err(key, "not in the file".into()))?;
        if src.size() != var.size() {
            return Err(err(
                key,
                format!("shape {:?} in the file, the model has {:?}", src.size(), var.size()),
            ));
        }
        tch::no_grad(|| var.f_copy_(&src.f_to_kind(var.kind())?)).map_err(|e| err(key, e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torchvision's resnet18 state_dict without `fc.*`, from `tests/fixtures/resnet_keys.py`.
    const RESNET18_KEYS: &str = include_str!("../../tests/fixtures/resnet18_keys.txt");

    fn names_and_shapes(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        v.sort();
        v
    }

    #[test]
    fn resnet18_names_and_shapes_match_torchvision() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        Backbone::new(vs.root(), BackboneKind::Resnet18, 64, NormKind::Batch);
        let mut expected: Vec<(String, Vec<i64>)> = RESNET18_KEYS
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("num_batches_tracked"))
            .map(|l| {
                let (name, shape) = l.split_once(' ').unwrap();
                (name.to_string(), shape.split(',').map(|d| d.parse().unwrap()).collect())
            })
            .collect();
        expected.sort();
        assert_eq!(expected.len(), 100);
        assert_eq!(names_and_shapes(&vs), expected);
    }

    /// Fills every variable as `tests/fixtures/resnet_forward.py` does.
    fn fill_deterministic(vs: &nn::VarStore) {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, (name, mut t)) in vars.into_iter().enumerate() {
            let f = (Tensor::arange(t.numel() as i64, tch::kind::DOUBLE_CPU) * 0.37 + k as f64).sin();
            let f = f.view(t.size().as_slice());
            let v = if t.dim() == 4 {
                f / ((t.numel() as i64 / t.size()[0]) as f64).sqrt()
            } else if name.ends_with("running_var") {
                &f * &f * 0.5 + 1.0
            } else if name.ends_with("weight") {
                f * 0.1 + 1.0
            } else {
                f * 0.1
            };
            tch::no_grad(|| t.copy_(&v.to_kind(tch::Kind::Float)));
        }
    }

    /// Sum and cos(0.1 i)-weighted sum of each tap, as printed by `resnet_forward.py`.
    fn tap_checksums(kind: BackboneKind) -> Vec<(f64, f64)> {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let b = Backbone::new(vs.root(), kind, 64, NormKind::Batch);
        fill_deterministic(&vs);
        let x = (Tensor::arange(3 * 64 * 64, tch::kind::FLOAT_CPU) * 0.01).sin().view([1, 3, 64, 64]);
        let taps = tch::no_grad(|| b.forward(&x, false)).unwrap();
        taps.iter()
            .map(|t| {
                let w = (Tensor::arange(t.numel() as i64, tch::kind::FLOAT_CPU) * 0.1).cos();
                (
                    t.sum(tch::Kind::Float).double_value(&[]),
                    (t.flatten(0, -1) * w).sum(tch::Kind::Float).double_value(&[]),
                )
            })
            .collect()
    }

    fn assert_checksums(got: &[(f64, f64)], want: &[(f64, f64)]) {
        for (g, w) in got.iter().zip(want) {
            let tol = 1e-4 * w.0.abs();
            assert!((g.0 - w.0).abs() < tol && (g.1 - w.1).abs() < tol, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn forward_matches_torchvision_with_the_same_weights() {
        // tests/fixtures/resnet_forward.py (torchvision 0.26.0, torch 2.11) printed:
        // basic_1111_w64 c3 [1, 128, 8, 8] 545.6633911132812 0.8685425519943237
        // basic_1111_w64 c4 [1, 256, 4, 4] 603.84326171875 -7.313275337219238
        // basic_1111_w64 c5 [1, 512, 2, 2] 402.032958984375 10.196610450744629
        // resnet50 c3 [1, 512, 8, 8] 10838.947265625 1.1255898475646973
        // resnet50 c4 [1, 1024, 4, 4] 11706.1826171875 1.9838680028915405
        // resnet50 c5 [1, 2048, 2, 2] 3951.27099609375 9.533833503723145
        let basic = [
            (545.663_391_113_281_2, 0.868_542_551_994_323_7),
            (603.843_261_718_75, -7.313_275_337_219_238),
            (402.032_958_984_375, 10.196_610_450_744_629),
        ];
        assert_checksums(&tap_checksums(BackboneKind::Tiny), &basic);
        let r50 = [
            (10_838.947_265_625, 1.125_589_847_564_697_3),
            (11_706.182_617_187_5, 1.983_868_002_891_540_5),
            (3_951.270_996_093_75, 9.533_833_503_723_145),
        ];
        assert_checksums(&tap_checksums(BackboneKind::Resnet50), &r50);
    }

    #[test]
    fn resnet50_has_bottlenecks_and_taps_at_strides_8_16_32() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let b = Backbone::new(vs.root(), BackboneKind::Resnet50, 8, NormKind::FrozenBatch);
        let names = vs.variables();
        assert_eq!(names["layer1.0.conv3.weight"].size(), [32, 8, 1, 1]);
        assert_eq!(names["layer4.0.downsample.0.weight"].size(), [256, 128, 1, 1]);
        assert!(!names["bn1.weight"].requires_grad(), "frozen BN affine is a buffer");
        assert!(vs.variables().keys().all(|n| !n.contains("layer4.3")));
        let taps = b.forward(&Tensor::zeros([1, 3, 50, 70], tch::kind::FLOAT_CPU), false).unwrap();
        let sizes: Vec<_> = taps.iter().map(|t| t.size()).collect();
        let f = feature_sizes(50, 70);
        assert_eq!(sizes[0], [1, 64, f[0].0, f[0].1]);
        assert_eq!(sizes[2], [1, 256, f[2].0, f[2].1]);
        assert_eq!(f, [(7, 9), (4, 5), (2, 3)]);
    }

    #[test]
    fn backbone_only_file_loads_under_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tiny.safetensors");
        let src = nn::VarStore::new(tch::Device::Cpu);
        Backbone::new(src.root(), BackboneKind::Tiny, 8, NormKind::Batch);
        let mut named: Vec<_> = src.variables().into_iter().collect();
        named.push(("fc.weight".into(), Tensor::ones([2, 64], tch::kind::FLOAT_CPU)));
        Tensor::write_safetensors(&named, &file).unwrap();

        let dst = nn::VarStore::new(tch::Device::Cpu);
        Backbone::new(&dst.root() / "backbone", BackboneKind::Tiny, 8, NormKind::Batch);
        load_backbone(&dst, "backbone", &file).unwrap();
        let loaded = dst.variables();
        for (name, t) in src.variables() {
            assert!(loaded[&format!("backbone.{name}")].equal(&t), "{name}");
        }
        let wider = nn::VarStore::new(tch::Device::Cpu);
        Backbone::new(&wider.root() / "backbone", BackboneKind::Tiny, 16, NormKind::Batch);
        let err = load_backbone(&wider, "backbone", &file).unwrap_err().to_string();
        assert!(err.contains("tiny.safetensors") && err.contains("shape"), "{err}");
    }
}
