//! Anchor-free detection with FCOS: a shared conv tower (GroupNorm) over P3-P5 with a learnt
//! scale per level, predicting per location class logits (sigmoid focal loss), ltrb box
//! distances (GIoU loss on positives) and centerness (BCE on positives). Targets come from
//! [`super::fcos_targets`], decoding and NMS from [`super::decode`].
use tch::{nn, Kind, Reduction, Tensor};

use super::fcos_targets::{FcosTargets, STRIDES};
use crate::model::norm::group_norm;

/// Convs in each of the classification and box towers.
const TOWER_DEPTH: usize = 4;
/// Focal loss parameters (Lin et al. 2017).
const FOCAL_ALPHA: f64 = 0.25;
const FOCAL_GAMMA: f64 = 2.0;
/// Initial foreground probability of the class logits.
const PRIOR_PROB: f64 = 0.01;

/// Raw head outputs, one tensor per level P3-P5.
#[derive(Debug)]
pub struct DetOutput {
    /// `[B,C,h,w]` class logits.
    pub cls_logits: Vec<Tensor>,
    /// `[B,4,h,w]` non-negative (l,t,r,b) distances in input pixels.
    pub ltrb: Vec<Tensor>,
    /// `[B,1,h,w]` centerness logits.
    pub centerness: Vec<Tensor>,
}

/// `[B,C,h,w]` per level → `[B, sum(h*w), C]`, levels concatenated in order.
pub(crate) fn flatten_levels(levels: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> = levels
        .iter()
        .map(|t| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([t.size()[0], -1, c])
        })
        .collect();
    Tensor::cat(&flat, 1)
}

fn tower(path: nn::Path<'_>, channels: i64) -> Vec<(nn::Conv2D, nn::GroupNorm)> {
    (0..TOWER_DEPTH)
        .map(|i| {
            let conv = nn::conv2d(&path / (2 * i), channels, channels, 3, head_conv_config(0.0));
            (conv, group_norm(&path / (2 * i + 1), channels))
        })
        .collect()
}

fn head_conv_config(bias: f64) -> nn::ConvConfig {
    nn::ConvConfig {
        padding: 1,
        ws_init: nn::Init::Randn { mean: 0.0, stdev: 0.01 },
        bs_init: nn::Init::Const(bias),
        ..Default::default()
    }
}

/// The FCOS head, shared across levels.
#[derive(Debug)]
pub struct DetectionHead {
    cls_tower: Vec<(nn::Conv2D, nn::GroupNorm)>,
    box_tower: Vec<(nn::Conv2D, nn::GroupNorm)>,
    cls_logits: nn::Conv2D,
    bbox_pred: nn::Conv2D,
    centerness: nn::Conv2D,
    scales: Tensor,
}

impl DetectionHead {
    /// Creates the towers, predictors and the three per-level `scales` under `path`.
    pub fn new(path: nn::Path<'_>, channels: i64, num_classes: i64) -> Self {
        let prior_bias = -((1.0 - PRIOR_PROB) / PRIOR_PROB).ln();
        DetectionHead {
            cls_tower: tower(&path / "cls_tower", channels),
            box_tower: tower(&path / "box_tower", channels),
            cls_logits: nn::conv2d(
                &path / "cls_logits",
                channels,
                num_classes,
                3,
                head_conv_config(prior_bias),
            ),
            bbox_pred: nn::conv2d(&path / "bbox_pred", channels, 4, 3, head_conv_config(0.0)),
            centerness: nn::conv2d(&path / "centerness", channels, 1, 3, head_conv_config(0.0)),
            scales: path.var("scales", &[3], nn::Init::Const(1.0)),
        }
    }

    /// Outputs for P3, P4, P5.
    pub fn forward(&self, features: &[Tensor; 3]) -> DetOutput {
        let run = |tower: &[(nn::Conv2D, nn::GroupNorm)], x: &Tensor| {
            tower.iter().fold(x.shallow_clone(), |x, (c, g)| x.apply(c).apply(g).relu())
        };
        let mut out = DetOutput { cls_logits: Vec::new(), ltrb: Vec::new(), centerness: Vec::new() };
        for (level, x) in features.iter().enumerate() {
            out.cls_logits.push(run(&self.cls_tower, x).apply(&self.cls_logits));
            let b = run(&self.box_tower, x);
            let scale = self.scales.get(level as i64);
            out.ltrb.push((b.apply(&self.bbox_pred) * scale).relu() * STRIDES[level] as f64);
            out.centerness.push(b.apply(&self.centerness));
        }
        out
    }
}

/// Sigmoid focal loss per element, as `torchvision.ops.sigmoid_focal_loss(reduction="none")`.
fn sigmoid_focal(logits: &Tensor, targets: &Tensor) -> Tensor {
    let p = logits.sigmoid();
    let ce = logits.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::None);
    let p_t: Tensor = &p * targets + (1.0 - &p) * (1.0 - targets);
    let alpha_t: Tensor = targets * FOCAL_ALPHA + (1.0 - targets) * (1.0 - FOCAL_ALPHA);
    let modulator = (1f64 - &p_t).pow_tensor_scalar(FOCAL_GAMMA);
    ce * modulator * alpha_t
}

/// `1 - GIoU` of boxes given as ltrb distances from the same point (`[K,4]` each), with
/// torchvision's `generalized_box_iou_loss` epsilon.
pub(crate) fn giou_loss_ltrb(pred: &Tensor, target: &Tensor) -> Tensor {
    let eps = 1e-7;
    let (p, t) = (pred.unbind(1), target.unbind(1));
    let area = |v: &[Tensor]| (&v[0] + &v[2]) * (&v[1] + &v[3]);
    let inter = (p[0].minimum(&t[0]) + p[2].minimum(&t[2])) * (p[1].minimum(&t[1]) + p[3].minimum(&t[3]));
    let union = area(&p) + area(&t) - &inter;
    let enclosing = (p[0].maximum(&t[0]) + p[2].maximum(&t[2])) * (p[1].maximum(&t[1]) + p[3].maximum(&t[3]));
    let iou = inter / (&union + eps);
    1.0 - (iou - (&enclosing - union) / (enclosing + eps))
}

/// FCOS centerness target of ltrb distances `[K,4]`.
pub(crate) fn centerness_target(ltrb: &Tensor) -> Tensor {
    let v = ltrb.unbind(1);
    let lr = v[0].minimum(&v[2]) / v[0].maximum(&v[2]);
    let tb = v[1].minimum(&v[3]) / v[1].maximum(&v[3]);
    (lr * tb).sqrt()
}

/// Focal loss over all locations of labelled images plus GIoU and centerness BCE over positive
/// locations, summed and divided by `normaliser` (positives, possibly summed over ranks;
/// clamped to at least 1).
pub fn loss(out: &DetOutput, targets: &FcosTargets, normaliser: f64) -> Tensor {
    let cls = flatten_levels(&out.cls_logits);
    let device = cls.device();
    let (b, n, c) = cls.size3().expect("[B,N,C]");
    let labels = targets.labels.to_device(device);
    let positive = labels.ge(0);
    let onehot = labels.clamp_min(0).one_hot(c).to_kind(Kind::Float) * positive.unsqueeze(-1);
    let image_mask = targets.labelled.to_device(device).to_kind(Kind::Float).view([b, 1, 1]);
    let focal = (sigmoid_focal(&cls, &onehot) * image_mask).sum(Kind::Float);

    let pos_index = positive.view([b * n]).nonzero().squeeze_dim(1);
    let pred_ltrb = flatten_levels(&out.ltrb).view([b * n, 4]).index_select(0, &pos_index);
    let target_ltrb = targets.ltrb.to_device(device).view([b * n, 4]).index_select(0, &pos_index);
    let giou = giou_loss_ltrb(&pred_ltrb, &target_ltrb).sum(Kind::Float);
    let ctr_logits = flatten_levels(&out.centerness).view([b * n]).index_select(0, &pos_index);
    let ctr = ctr_logits.binary_cross_entropy_with_logits::<Tensor>(
        &centerness_target(&target_ltrb),
        None,
        None,
        Reduction::Sum,
    );
    (focal + giou + ctr) / normaliser.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focal_and_giou_match_torchvision() {
        // import torch; from torchvision.ops import sigmoid_focal_loss, generalized_box_iou_loss
        // x = torch.tensor([[2., -1.], [-3., 0.5]]); y = torch.tensor([[1., 0.], [0., 1.]])
        // print(sigmoid_focal_loss(x, y, reduction='sum').item())  # 0.034419767558574677
        // p = torch.tensor([[10., 20., 30., 40.]]); t = torch.tensor([[12., 18., 35., 38.]])
        // print(generalized_box_iou_loss(p, t).item())  # 0.4209769368171692
        let x = Tensor::from_slice2(&[[2f32, -1.], [-3., 0.5]]);
        let y = Tensor::from_slice2(&[[1f32, 0.], [0., 1.]]);
        let focal = sigmoid_focal(&x, &y).sum(Kind::Float).double_value(&[]);
        assert!((focal - FOCAL_REF).abs() < 1e-6, "{focal}");
        // The same boxes as ltrb distances from the point (20, 25) inside both.
        let p = Tensor::from_slice2(&[[10f32, 5., 10., 15.]]);
        let t = Tensor::from_slice2(&[[8f32, 7., 15., 13.]]);
        let g = giou_loss_ltrb(&p, &t).double_value(&[0]);
        assert!((g - GIOU_REF).abs() < 1e-6, "{g}");
    }

    const FOCAL_REF: f64 = 0.034_419_767_558_574_677;
    const GIOU_REF: f64 = 0.420_976_936_817_169_2;
}
