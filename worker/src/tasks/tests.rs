//! Loss tests on whole batches: distributed normalisation, masking, zero labels, decoding.
use mtl_job::{ModelSection, NormKind, TasksSection};
use tch::{Device, Kind, Tensor};

use super::decode::{decode, nms, DecodeParams, Detection};
use super::detection::DetOutput;
use super::fcos_targets::FcosTargets;
use crate::data::batch::{ClassTarget, DatasetInfo, GtBox, OriginalSample};
use crate::data::Batch;
use crate::model::MultiTaskModel;
use crate::task::TaskLosses;
use crate::train::losses::*;

/// A dataset with 4 classes, 3 detection categories and 3 segmentation classes.
pub(crate) fn test_info() -> DatasetInfo {
    DatasetInfo {
        class_names: (0..4).map(|i| format!("c{i}")).collect(),
        multi_label: false,
        det_categories: (0..3).map(|i| (i as u64 + 1, format!("d{i}"))).collect(),
        seg_classes: vec!["background".into(), "a".into(), "b".into()],
    }
}

/// A tiny model with GroupNorm (independent of the batch split).
pub(crate) fn test_model(tasks: &TasksSection) -> MultiTaskModel {
    let cfg = ModelSection { norm: NormKind::Group, ..ModelSection::default() };
    crate::model::with_seed(0, || MultiTaskModel::new(&cfg, tasks, &test_info(), Device::Cpu)).unwrap()
}

fn gt(x1: f32, y1: f32, x2: f32, y2: f32, category: u32) -> GtBox {
    GtBox { x1, y1, x2, y2, category, iscrowd: false }
}

/// A batch of `labelled.len()` 64x64 images; sample i is labelled for a task when its flag
/// is set. Boxes are drawn into the mask as category + 1.
pub(crate) fn test_batch(labelled: &[(bool, bool, bool)], seed: i64) -> Batch {
    let b = labelled.len() as i64;
    let boxes: Vec<Vec<GtBox>> = (0..b)
        .map(|i| {
            let o = 4.0 * i as f32;
            vec![
                gt(4.0 + o, 6.0, 30.0 + o, 28.0, (i % 3) as u32),
                gt(30.0, 34.0 - o, 60.0, 62.0, ((i + 1) % 3) as u32),
            ]
        })
        .collect();
    let mut masks = Vec::new();
    for (image_boxes, &(_, _, seg)) in boxes.iter().zip(labelled) {
        let mask = if seg {
            Tensor::zeros([64, 64], (Kind::Int64, Device::Cpu))
        } else {
            Tensor::full([64, 64], 255, (Kind::Int64, Device::Cpu))
        };
        if seg {
            for g in image_boxes.iter().take(1) {
                let _ = mask
                    .narrow(0, g.y1 as i64, (g.y2 - g.y1) as i64)
                    .narrow(1, g.x1 as i64, (g.x2 - g.x1) as i64)
                    .fill_(i64::from(g.category % 2 + 1));
            }
            let _ = mask.narrow(0, 0, 2).fill_(255);
        }
        masks.push(mask);
    }
    let classes: Vec<i64> =
        labelled.iter().enumerate().map(|(i, l)| if l.0 { i as i64 % 4 } else { -1 }).collect();
    Batch {
        ids: (0..b as u64).collect(),
        images: crate::model::with_seed(seed, || Tensor::randn([b, 3, 64, 64], (Kind::Float, Device::Cpu))),
        class_target: ClassTarget::Single(Tensor::from_slice(&classes)),
        class_labelled: Tensor::from_slice(&labelled.iter().map(|l| l.0).collect::<Vec<_>>()),
        boxes,
        boxes_labelled: labelled.iter().map(|l| l.1).collect(),
        mask_target: Tensor::stack(&masks, 0),
        mask_labelled: Tensor::from_slice(&labelled.iter().map(|l| l.2).collect::<Vec<_>>()),
        originals: vec![OriginalSample { width: 64, height: 64, boxes: Vec::new() }; labelled.len()],
        det_targets: None,
        colour_jitter: None,
    }
}

/// Samples `range` of `batch` as a batch of their own.
fn slice(batch: &Batch, start: usize, len: usize) -> Batch {
    let (s, l) = (start as i64, len as i64);
    let class_target = match &batch.class_target {
        ClassTarget::Single(t) => ClassTarget::Single(t.narrow(0, s, l)),
        ClassTarget::Multi(t) => ClassTarget::Multi(t.narrow(0, s, l)),
    };
    Batch {
        ids: batch.ids[start..start + len].to_vec(),
        images: batch.images.narrow(0, s, l),
        class_target,
        class_labelled: batch.class_labelled.narrow(0, s, l),
        boxes: batch.boxes[start..start + len].to_vec(),
        boxes_labelled: batch.boxes_labelled[start..start + len].to_vec(),
        mask_target: batch.mask_target.narrow(0, s, l),
        mask_labelled: batch.mask_labelled.narrow(0, s, l),
        originals: batch.originals[start..start + len].to_vec(),
        det_targets: None,
        colour_jitter: None,
    }
}

/// Sum of the task losses of `batch` with `normalisers` (local counts if `None`).
fn total_loss(model: &MultiTaskModel, batch: &Batch, normalisers: Option<Counts>) -> (Tensor, TaskLosses) {
    let targets = build_targets(model, batch).unwrap();
    let counts = normalisers.unwrap_or_else(|| host_counts(batch, &targets));
    let losses = task_losses(
        &model.forward(&batch.images, true).unwrap(),
        batch,
        &targets,
        &counts.normalisers(Device::Cpu),
    )
    .unwrap();
    let total = losses.iter().map(|(_, l)| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    (total, losses)
}

fn grads(model: &MultiTaskModel) -> Vec<(String, Tensor)> {
    model.parameters().into_iter().map(|(n, p)| (n, p.grad().copy())).collect()
}

fn zero_grads(model: &MultiTaskModel) {
    for (_, mut p) in model.parameters() {
        p.zero_grad();
    }
}

const MIXED: [(bool, bool, bool); 4] =
    [(true, true, true), (false, true, false), (true, false, true), (true, true, false)];

#[test]
fn halves_with_the_global_normaliser_sum_to_the_full_batch_gradient() {
    let model = test_model(&TasksSection::default());
    let batch = test_batch(&MIXED, 1);
    let (full, _) = total_loss(&model, &batch, None);
    zero_grads(&model);
    full.backward();
    let expected = grads(&model);

    let (a, b) = (slice(&batch, 0, 2), slice(&batch, 2, 2));
    let global = host_counts(&batch, &build_targets(&model, &batch).unwrap());
    let sum = host_counts(&a, &build_targets(&model, &a).unwrap())
        + host_counts(&b, &build_targets(&model, &b).unwrap());
    assert_eq!(global, sum, "counts add up across ranks");
    assert!(global.det_positives > 0.0 && global.seg_valid_pixels > 0.0);
    zero_grads(&model);
    let (la, _) = total_loss(&model, &a, Some(global));
    let (lb, _) = total_loss(&model, &b, Some(global));
    la.backward();
    lb.backward();
    assert!((la.double_value(&[]) + lb.double_value(&[]) - full.double_value(&[])).abs() < 1e-5);
    for ((name, want), (_, got)) in expected.iter().zip(grads(&model)) {
        let diff = (want - &got).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: max |diff| = {diff}");
    }
}

#[test]
fn unlabelled_samples_contribute_nothing() {
    let model = test_model(&TasksSection::default());
    let labels = [(true, true, true), (false, false, false)];
    let batch = test_batch(&labels, 2);
    let (_, before) = total_loss(&model, &batch, None);
    // Change everything about the unlabelled sample: pixels, boxes, class, mask.
    let mut changed = test_batch(&labels, 3);
    changed.images.narrow(0, 0, 1).copy_(&batch.images.narrow(0, 0, 1));
    changed.boxes[1] = vec![gt(0.0, 0.0, 50.0, 50.0, 2)];
    changed.class_target = ClassTarget::Single(Tensor::from_slice(&[0i64, 3]));
    let _ = changed.mask_target.get(1).fill_(1);
    let (_, after) = total_loss(&model, &changed, None);
    for ((task, x), (_, y)) in before.iter().zip(after.iter()) {
        assert!((x - y).abs().double_value(&[]) < 1e-6, "{task:?}");
    }
    let only_first = total_loss(&model, &slice(&batch, 0, 1), None).1;
    for ((task, x), (_, y)) in before.iter().zip(only_first.iter()) {
        assert!((x - y).abs().double_value(&[]) < 1e-5, "{task:?}: same as the labelled sample alone");
    }
}

#[test]
fn no_labels_give_zero_losses_and_zero_gradients_everywhere() {
    let model = test_model(&TasksSection::default());
    let batch = test_batch(&[(false, false, false), (false, false, false)], 4);
    let targets = build_targets(&model, &batch).unwrap();
    let counts = host_counts(&batch, &targets);
    assert_eq!(counts, Counts { samples: 2.0, ..Counts::default() });
    let (total, losses) = total_loss(&model, &batch, None);
    assert_eq!(losses.iter().count(), 3);
    assert_eq!(total.double_value(&[]), 0.0);
    zero_grads(&model);
    total.backward();
    for (name, p) in model.parameters() {
        let g = p.grad();
        assert!(g.defined(), "{name} has no gradient");
        assert_eq!(g.abs().max().double_value(&[]), 0.0, "{name}");
    }
}

#[test]
fn a_disabled_task_has_no_loss() {
    let tasks = TasksSection { detection: false, ..TasksSection::default() };
    let model = test_model(&tasks);
    let (_, losses) = total_loss(&model, &test_batch(&MIXED, 5), None);
    assert!(losses.det.is_none() && losses.cls.is_some() && losses.seg.is_some());
}

/// Turns per-location targets into the head outputs a perfect model would produce.
fn perfect_outputs(t: &FcosTargets, sizes: &[(i64, i64); 3], classes: i64) -> DetOutput {
    let mut out = DetOutput { cls_logits: Vec::new(), ltrb: Vec::new(), centerness: Vec::new() };
    let mut start = 0;
    for &(h, w) in sizes {
        let labels = t.labels.narrow(1, start, h * w).view([-1, h, w]);
        let pos = labels.ge(0).to_kind(Kind::Float);
        let onehot = labels.clamp_min(0).one_hot(classes).to_kind(Kind::Float) * pos.unsqueeze(-1);
        out.cls_logits.push(onehot.permute([0, 3, 1, 2]) * 20.0 - 10.0);
        out.ltrb.push(t.ltrb.narrow(1, start, h * w).view([-1, h, w, 4]).permute([0, 3, 1, 2]));
        out.centerness.push(pos.unsqueeze(1) * 20.0 - 10.0);
        start += h * w;
    }
    out
}

#[test]
fn decoding_perfect_predictions_recovers_the_boxes() {
    let boxes =
        vec![gt(4.0, 4.0, 28.0, 28.0, 0), gt(36.0, 20.0, 60.0, 52.0, 2), gt(0.0, 0.0, 250.0, 200.0, 1)];
    let sizes = crate::model::backbone::feature_sizes(256, 256);
    let t = FcosTargets::new(std::slice::from_ref(&boxes), &[true], &sizes).unwrap();
    assert!(t.num_positives >= 3);
    let params =
        DecodeParams { score_threshold: 0.5, pre_nms_top_k: 1000, nms_iou: 0.6, max_detections: 100 };
    let mut dets = decode(&perfect_outputs(&t, &sizes, 3), (256, 256), &params).unwrap().remove(0);
    assert_eq!(dets.len(), 3, "{dets:?}");
    dets.sort_by_key(|d| d.category);
    for (d, g) in dets.iter().zip([&boxes[0], &boxes[2], &boxes[1]]) {
        assert_eq!(d.category, g.category);
        let err =
            [d.x1 - g.x1, d.y1 - g.y1, d.x2 - g.x2, d.y2 - g.y2].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(err < 1e-4, "{d:?} vs {g:?}");
        assert!(d.score > 0.99);
    }
}

#[test]
fn build_targets_takes_the_loader_s_targets_and_checks_their_grid() {
    let model = test_model(&TasksSection::default());
    let mut batch = test_batch(&MIXED, 1);
    // No targets in the batch (made by hand): assigned here.
    let assigned = build_targets(&model, &batch).unwrap().det.unwrap();
    assert!(assigned.num_positives > 0);
    // Targets the loader built (the same function, pinned or not): used as they are, not rebuilt.
    let sizes = model.feature_sizes(64, 64);
    batch.det_targets = Some(FcosTargets::build(&batch.boxes, &batch.boxes_labelled, &sizes, false).unwrap());
    let loaded = batch.det_targets.as_ref().unwrap();
    let taken = build_targets(&model, &batch).unwrap().det.unwrap();
    assert_eq!(taken.labels.data_ptr(), loaded.labels.data_ptr(), "the batch's tensors, not new ones");
    assert!(taken.labels.equal(&assigned.labels) && taken.ltrb.equal(&assigned.ltrb));
    assert!(taken.labelled.equal(&assigned.labelled));
    assert_eq!((taken.num_positives, taken.sizes), (assigned.num_positives, assigned.sizes));
    // On the device too (the step moves the batch first).
    let on_device = batch.to_device(Device::Cpu).unwrap();
    let moved = build_targets(&model, &on_device).unwrap().det.unwrap();
    assert!(moved.labels.equal(&assigned.labels) && moved.ltrb.equal(&assigned.ltrb));
    // Targets on another grid than the model's for these images are an error.
    let other = model.feature_sizes(32, 32);
    batch.det_targets = Some(FcosTargets::new(&batch.boxes, &batch.boxes_labelled, &other).unwrap());
    let err = build_targets(&model, &batch).unwrap_err().to_string();
    assert!(err.contains("detection targets") && err.contains("grid"), "{err}");
    // Without a detection head there are no targets, whatever the batch carries.
    let no_det = test_model(&TasksSection { detection: false, ..TasksSection::default() });
    assert!(build_targets(&no_det, &batch).unwrap().det.is_none());
}

#[test]
fn nms_is_class_wise_and_greedy() {
    let d = |x1: f32, score: f32, category: u32| Detection {
        x1,
        y1: 0.0,
        x2: x1 + 10.0,
        y2: 10.0,
        score,
        category,
    };
    // IoU of boxes shifted by 1 is 90/110 = 0.82; shifted by 6 it is 40/160 = 0.25.
    let kept = nms(vec![d(1.0, 0.8, 0), d(0.0, 0.9, 0), d(0.0, 0.7, 1), d(6.0, 0.6, 0)], 0.5);
    assert_eq!(kept, vec![d(0.0, 0.9, 0), d(0.0, 0.7, 1), d(6.0, 0.6, 0)]);
    assert!((d(0.0, 1.0, 0).iou(&d(1.0, 1.0, 0)) - 90.0 / 110.0).abs() < 1e-6);
}

#[test]
fn multi_label_classification_masks_unlabelled_rows() {
    let tasks =
        TasksSection { multi_label: true, detection: false, segmentation: false, ..TasksSection::default() };
    let info = DatasetInfo { multi_label: true, ..test_info() };
    let model = crate::model::with_seed(0, || {
        MultiTaskModel::new(&ModelSection::default(), &tasks, &info, Device::Cpu)
    })
    .unwrap();
    let mut batch = test_batch(&[(true, false, false), (false, false, false)], 6);
    batch.class_target = ClassTarget::Multi(Tensor::from_slice2(&[[1f32, 0., 1., 0.], [1., 1., 1., 1.]]));
    let (_, losses) = total_loss(&model, &batch, None);
    let logits = model.forward(&batch.images, true).unwrap().cls.unwrap().get(0);
    let target = Tensor::from_slice(&[1f32, 0., 1., 0.]);
    let want = logits.binary_cross_entropy_with_logits::<Tensor>(&target, None, None, tch::Reduction::Sum);
    assert!((losses.cls.unwrap() - want).abs().double_value(&[]) < 1e-6);
}

#[test]
fn a_class_outside_the_head_is_an_error_naming_the_loss() {
    let model = test_model(&TasksSection::default());
    let mut batch = test_batch(&MIXED, 8);
    batch.class_target = ClassTarget::Single(Tensor::from_slice(&[0i64, -1, 9, 1]));
    let targets = build_targets(&model, &batch).unwrap();
    let counts = host_counts(&batch, &targets);
    let outputs = model.forward(&batch.images, true).unwrap();
    let err =
        task_losses(&outputs, &batch, &targets, &counts.normalisers(Device::Cpu)).unwrap_err().to_string();
    assert!(err.starts_with("classification loss: ") && err.contains("out of bounds"), "{err}");
}
