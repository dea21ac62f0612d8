//! Anchor-free detection with FCOS: a shared conv tower (GroupNorm) over P3-P5 with a learnt
//! scale per level, predicting per location class logits (sigmoid focal loss), ltrb box
//! distances (GIoU loss on positives) and centerness (BCE on positives). Targets come from
//! [`super::fcos_targets`], decoding and NMS from [`super::decode`].
use tch::{nn, Kind, Reduction, TchError, Tensor};

use super::fcos_targets::{FcosTargets, STRIDES};
use crate::model::layers::{group_norm as apply_group_norm, Conv2d};
use crate::model::norm::group_norm;
use crate::{At, WorkerError};

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
pub(crate) fn flatten_levels(levels: &[Tensor]) -> Result<Tensor, TchError> {
    let flat = levels
        .iter()
        .map(|t| {
            let (b, c, _, _) = t.size4()?;
            t.f_permute([0, 2, 3, 1])?.f_reshape([b, -1, c])
        })
        .collect::<Result<Vec<_>, _>>()?;
    Tensor::f_cat(&flat, 1)
}

type Tower = Vec<(Conv2d, nn::GroupNorm)>;

fn tower(path: nn::Path<'_>, channels: i64) -> Tower {
    (0..TOWER_DEPTH)
        .map(|i| {
            let conv = Conv2d::new(&path / (2 * i), channels, channels, 3, head_conv_config(0.0));
            (conv, group_norm(&path / (2 * i + 1), channels))
        })
        .collect()
}

fn run_tower(tower: &Tower, x: &Tensor) -> Result<Tensor, TchError> {
    tower.iter().try_fold(x.shallow_clone(), |x, (c, g)| apply_group_norm(g, &c.forward(&x)?)?.f_relu())
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
pub(crate) struct DetectionHead {
    cls_tower: Tower,
    box_tower: Tower,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    centerness: Conv2d,
    scales: Tensor,
}

impl DetectionHead {
    /// Creates the towers, predictors and the three per-level `scales` under `path`.
    pub(crate) fn new(path: nn::Path<'_>, channels: i64, num_classes: i64) -> Self {
        let prior_bias = -((1.0 - PRIOR_PROB) / PRIOR_PROB).ln();
        DetectionHead {
            cls_tower: tower(&path / "cls_tower", channels),
            box_tower: tower(&path / "box_tower", channels),
            cls_logits: Conv2d::new(
                &path / "cls_logits",
                channels,
                num_classes,
                3,
                head_conv_config(prior_bias),
            ),
            bbox_pred: Conv2d::new(&path / "bbox_pred", channels, 4, 3, head_conv_config(0.0)),
            centerness: Conv2d::new(&path / "centerness", channels, 1, 3, head_conv_config(0.0)),
            scales: path.var("scales", &[3], nn::Init::Const(1.0)),
        }
    }

    /// Outputs for P3, P4, P5.
    pub(crate) fn forward(&self, features: &[Tensor; 3]) -> Result<DetOutput, WorkerError> {
        self.forward_unnamed(features).at("detection head")
    }

    fn forward_unnamed(&self, features: &[Tensor; 3]) -> Result<DetOutput, TchError> {
        let mut out = DetOutput { cls_logits: Vec::new(), ltrb: Vec::new(), centerness: Vec::new() };
        for (level, x) in features.iter().enumerate() {
            out.cls_logits.push(self.cls_logits.forward(&run_tower(&self.cls_tower, x)?)?);
            let b = run_tower(&self.box_tower, x)?;
            let scale = self.scales.f_get(level as i64)?;
            let ltrb = self.bbox_pred.forward(&b)?.f_mul(&scale)?.f_relu()?;
            out.ltrb.push(ltrb.f_mul_scalar(STRIDES[level] as f64)?);
            out.centerness.push(self.centerness.forward(&b)?);
        }
        Ok(out)
    }
}

/// Sigmoid focal loss per element, as `torchvision.ops.sigmoid_focal_loss(reduction="none")`.
fn sigmoid_focal(logits: &Tensor, targets: &Tensor) -> Result<Tensor, TchError> {
    let p = logits.f_sigmoid()?;
    let ce = logits.f_binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::None)?;
    let not_targets = targets.f_neg()?.f_add_scalar(1.0)?;
    // p_t = p·y + (1 − p)·(1 − y); alpha_t = α·y + (1 − α)·(1 − y)
    let p_t = p.f_mul(targets)?.f_add(&p.f_neg()?.f_add_scalar(1.0)?.f_mul(&not_targets)?)?;
    let alpha_t = targets.f_mul_scalar(FOCAL_ALPHA)?.f_add(&not_targets.f_mul_scalar(1.0 - FOCAL_ALPHA)?)?;
    let modulator = p_t.f_neg()?.f_add_scalar(1.0)?.f_pow_tensor_scalar(FOCAL_GAMMA)?;
    ce.f_mul(&modulator)?.f_mul(&alpha_t)
}

/// `1 - GIoU` of boxes given as ltrb distances from the same point (`[K,4]` each), with
/// torchvision's `generalized_box_iou_loss` epsilon.
pub(crate) fn giou_loss_ltrb(pred: &Tensor, target: &Tensor) -> Result<Tensor, TchError> {
    let eps = 1e-7;
    let (p, t) = (pred.f_unbind(1)?, target.f_unbind(1)?);
    if p.len() != 4 || t.len() != 4 {
        return Err(TchError::Shape(format!("ltrb boxes need 4 columns, got {} and {}", p.len(), t.len())));
    }
    let area = |v: &[Tensor]| v[0].f_add(&v[2])?.f_mul(&v[1].f_add(&v[3])?);
    let extent = |a: &Tensor, b: &Tensor, max: bool| if max { a.f_maximum(b) } else { a.f_minimum(b) };
    // Sum of the extents along one axis (l + r or t + b) of the intersection or the enclosure.
    let span = |i: usize, j: usize, max: bool| extent(&p[i], &t[i], max)?.f_add(&extent(&p[j], &t[j], max)?);
    let inter = span(0, 2, false)?.f_mul(&span(1, 3, false)?)?;
    let union = area(&p)?.f_add(&area(&t)?)?.f_sub(&inter)?;
    let enclosing = span(0, 2, true)?.f_mul(&span(1, 3, true)?)?;
    let iou = inter.f_div(&union.f_add_scalar(eps)?)?;
    let penalty = enclosing.f_sub(&union)?.f_div(&enclosing.f_add_scalar(eps)?)?;
    iou.f_sub(&penalty)?.f_neg()?.f_add_scalar(1.0)
}

/// FCOS centerness target of ltrb distances `[K,4]`.
pub(crate) fn centerness_target(ltrb: &Tensor) -> Result<Tensor, TchError> {
    let v = ltrb.f_unbind(1)?;
    if v.len() != 4 {
        return Err(TchError::Shape(format!("ltrb boxes need 4 columns, got {}", v.len())));
    }
    let lr = v[0].f_minimum(&v[2])?.f_div(&v[0].f_maximum(&v[2])?)?;
    let tb = v[1].f_minimum(&v[3])?.f_div(&v[1].f_maximum(&v[3])?)?;
    lr.f_mul(&tb)?.f_sqrt()
}

/// Focal loss over all locations of labelled images plus GIoU and centerness BCE over positive
/// locations, summed and divided by `normaliser` (positives, possibly summed over ranks, at
/// least 1: a 0-dim tensor).
pub(crate) fn loss(
    out: &DetOutput,
    targets: &FcosTargets,
    normaliser: &Tensor,
) -> Result<Tensor, WorkerError> {
    loss_unnamed(out, targets, normaliser).at("detection loss")
}

fn loss_unnamed(out: &DetOutput, targets: &FcosTargets, normaliser: &Tensor) -> Result<Tensor, TchError> {
    let cls = flatten_levels(&out.cls_logits)?;
    let device = cls.device();
    let (b, n, c) = cls.size3()?;
    let labels = crate::train::upload(&targets.labels, device)?;
    let positive = labels.f_ge(0)?;
    // One-hot by comparison with the class indices: background (-1) matches none. (`one_hot`
    // checks its input's range with two host reads on the CPU.)
    let classes = Tensor::f_arange(c, (Kind::Int64, device))?;
    let onehot = labels.f_unsqueeze(-1)?.f_eq_tensor(&classes)?.f_to_kind(Kind::Float)?;
    let labelled = crate::train::upload(&targets.labelled, device)?;
    let image_mask = labelled.f_to_kind(Kind::Float)?.f_view([b, 1, 1])?;
    let focal = sigmoid_focal(&cls, &onehot)?.f_mul(&image_mask)?.f_sum(Kind::Float)?;

    // Box and centerness terms over every location, masked to the positives: no `nonzero`,
    // whose output size the host would have to wait for. Background targets are replaced by a
    // unit box first, so that no NaN (centerness of a zero box) meets the mask.
    let positive = positive.f_view([b * n])?;
    let weight = positive.f_to_kind(Kind::Float)?;
    let target_ltrb = crate::train::upload(&targets.ltrb, device)?.f_view([b * n, 4])?;
    let target_ltrb = target_ltrb.f_where_scalarother(&positive.f_unsqueeze(-1)?, 1.0)?;
    let pred_ltrb = flatten_levels(&out.ltrb)?.f_view([b * n, 4])?;
    let giou = giou_loss_ltrb(&pred_ltrb, &target_ltrb)?.f_mul(&weight)?.f_sum(Kind::Float)?;
    let ctr_logits = flatten_levels(&out.centerness)?.f_view([b * n])?;
    let ctr = ctr_logits.f_binary_cross_entropy_with_logits(
        &centerness_target(&target_ltrb)?,
        Some(&weight),
        None::<&Tensor>,
        Reduction::Sum,
    )?;
    focal.f_add(&giou)?.f_add(&ctr)?.f_div(normaliser)
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
        let focal = sigmoid_focal(&x, &y).unwrap().sum(Kind::Float).double_value(&[]);
        assert!((focal - FOCAL_REF).abs() < 1e-6, "{focal}");
        // The same boxes as ltrb distances from the point (20, 25) inside both.
        let p = Tensor::from_slice2(&[[10f32, 5., 10., 15.]]);
        let t = Tensor::from_slice2(&[[8f32, 7., 15., 13.]]);
        let g = giou_loss_ltrb(&p, &t).unwrap().double_value(&[0]);
        assert!((g - GIOU_REF).abs() < 1e-6, "{g}");
    }

    const FOCAL_REF: f64 = 0.034_419_767_558_574_677;
    const GIOU_REF: f64 = 0.420_976_936_817_169_2;
}
