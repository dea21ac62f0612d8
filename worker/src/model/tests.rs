//! Model-level tests: shapes, task switches, parameter groups, prediction, timing.
use mtl_job::{ModelSection, TasksSection};
use tch::{Device, Kind, Tensor};

use super::*;
use crate::task::TaskLosses;
use crate::tasks::tests::{test_batch, test_info, test_model};
use crate::train::losses::{build_targets, host_counts, task_losses};

/// The task losses of `batch` (on the model's device), normalised by its own counts.
fn batch_losses(model: &MultiTaskModel, batch: &crate::data::Batch) -> TaskLosses {
    let targets = build_targets(model, batch).unwrap();
    let normalisers = host_counts(batch, &targets).normalisers(batch.images.device());
    task_losses(&model.forward(&batch.images, true).unwrap(), batch, &targets, &normalisers).unwrap()
}

#[test]
fn tiny_forward_shapes() {
    let model = test_model(&TasksSection::default());
    let out = model
        .forward(&with_seed(1, || Tensor::randn([2, 3, 64, 48], (Kind::Float, Device::Cpu))), true)
        .unwrap();
    assert_eq!(out.cls.unwrap().size(), [2, 4]);
    let det = out.det.unwrap();
    assert_eq!(det.cls_logits[0].size(), [2, 3, 8, 6]);
    assert_eq!(det.ltrb[2].size(), [2, 4, 2, 2]);
    assert_eq!(det.centerness[1].size(), [2, 1, 4, 3]);
    assert!(det.ltrb.iter().all(|t| t.min().double_value(&[]) >= 0.0));
    assert_eq!(out.seg.unwrap().size(), [2, 3, 64, 48]);
}

#[test]
fn disabled_tasks_have_no_head_and_no_output() {
    let tasks = TasksSection { classification: false, segmentation: false, ..TasksSection::default() };
    let model = test_model(&tasks);
    assert!(model.head_parameters(Task::Classification).is_empty());
    assert!(model.head_parameters(Task::Segmentation).is_empty());
    assert!(!model.head_parameters(Task::Detection).is_empty());
    let out = model.forward(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)), false).unwrap();
    assert!(out.cls.is_none() && out.seg.is_none() && out.det.is_some());
}

#[test]
fn parameters_split_into_shared_and_per_task_groups() {
    let model = test_model(&TasksSection::default());
    let all: Vec<String> = model.parameters().into_iter().map(|(n, _)| n).collect();
    let mut groups: Vec<String> = model.shared_parameters().into_iter().map(|(n, _)| n).collect();
    for task in Task::ALL {
        groups.extend(model.head_parameters(task).into_iter().map(|(n, _)| n));
    }
    groups.sort();
    assert_eq!(groups, all, "every parameter in exactly one group");
    assert!(all.contains(&"backbone.layer1.0.conv1.weight".to_string()));
    assert!(all.contains(&"heads.detection.scales".to_string()));
    let vars = model.var_store().variables();
    assert!(MultiTaskModel::no_weight_decay(&vars["backbone.bn1.bias"]));
    assert!(MultiTaskModel::no_weight_decay(&vars["heads.classification.fc.bias"]));
    assert!(!MultiTaskModel::no_weight_decay(&vars["neck.output.0.weight"]));
}

#[test]
fn dataset_mismatch_names_the_key() {
    let tasks = TasksSection { multi_label: true, ..TasksSection::default() };
    let err = crate::model::with_seed(0, || {
        MultiTaskModel::new(&ModelSection::default(), &tasks, &test_info(), Device::Cpu)
    })
    .unwrap_err();
    assert!(err.to_string().contains("tasks.multi_label"), "{err}");
}

#[test]
fn predictions_cover_every_enabled_task() {
    let model =
        test_model(&TasksSection { score_threshold: 0.0, max_detections: 7, ..TasksSection::default() });
    let preds =
        predict(&model, &with_seed(2, || Tensor::randn([3, 3, 32, 40], (Kind::Float, Device::Cpu)))).unwrap();
    assert_eq!(preds.len(), 3);
    for p in &preds {
        assert!(
            matches!(p.class, Some(crate::tasks::classification::ClassPrediction::Single { index, .. }) if index < 4)
        );
        assert_eq!(p.mask.as_ref().unwrap().len(), 32 * 40);
        assert_eq!(p.detections.len(), 7);
        assert!(p.detections.windows(2).all(|w| w[0].score >= w[1].score));
    }
}

/// Forward + backward of the tiny model on 8 64x64 images; `cargo test -- --ignored` prints it.
#[test]
#[ignore = "timing, run by hand"]
fn tiny_step_timing() {
    tch::set_num_threads(1);
    let model = test_model(&TasksSection::default());
    let batch = test_batch(&[(true, true, true); 8], 0);
    let step = || {
        let losses = batch_losses(&model, &batch);
        let total = losses.iter().map(|(_, l)| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
        total.backward();
    };
    step();
    let start = std::time::Instant::now();
    for _ in 0..5 {
        step();
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / 5.0;
    eprintln!("tiny forward+backward, batch 8 at 64x64, one thread: {ms:.1} ms");
    assert!(ms < 1000.0);
}

/// A training step and a prediction on CUDA when there is a GPU (CPU otherwise), the batch
/// moved there as the training step moves it.
#[test]
fn a_step_runs_on_the_available_device() {
    let device = Device::cuda_if_available();
    let model = super::with_seed(0, || {
        MultiTaskModel::new(&ModelSection::default(), &TasksSection::default(), &test_info(), device)
    })
    .unwrap();
    let batch = test_batch(&[(true, true, true), (false, true, false)], 0);
    let batch = batch.to_device(device).unwrap();
    let images = batch.images.shallow_clone();
    let losses = batch_losses(&model, &batch);
    let total = losses.iter().map(|(_, l)| l.shallow_clone()).reduce(|a, b| a + b).unwrap();
    total.backward();
    assert!(total.double_value(&[]).is_finite());
    assert!(model.parameters().iter().all(|(_, p)| p.grad().defined()));
    assert_eq!(predict(&model, &images).unwrap().len(), 2);
}

#[test]
fn frozen_batch_norm_is_neither_trained_nor_updated() {
    let frozen = ModelSection { norm: mtl_job::NormKind::FrozenBatch, ..ModelSection::default() };
    let model = crate::model::with_seed(0, || {
        MultiTaskModel::new(&frozen, &TasksSection::default(), &test_info(), Device::Cpu)
    })
    .unwrap();
    let names: Vec<String> = model.shared_parameters().into_iter().map(|(n, _)| n).collect();
    assert!(names.iter().all(|n| !n.contains("bn") && !n.contains("downsample.1")), "{names:?}");
    assert!(model.var_store().variables().contains_key("backbone.layer2.0.downsample.1.running_var"));
    // Every draw from LibTorch's one generator under its lock (`with_seed`): see there.
    let x = with_seed(3, || Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)));
    let first = model.forward(&x, true).unwrap().cls.unwrap();
    let second = model.forward(&x, true).unwrap().cls.unwrap();
    assert!(first.equal(&second), "train mode must not change frozen statistics");

    let batch_norm = ModelSection { norm: mtl_job::NormKind::Batch, ..ModelSection::default() };
    let model = crate::model::with_seed(0, || {
        MultiTaskModel::new(&batch_norm, &TasksSection::default(), &test_info(), Device::Cpu)
    })
    .unwrap();
    let mean = || model.var_store().variables()["backbone.bn1.running_mean"].copy();
    let before = mean();
    let _ = model.forward(&x, true).unwrap();
    assert!(!mean().equal(&before), "BatchNorm updates its running mean in training");
}

#[test]
fn every_task_reaches_the_gradnorm_layer_from_the_first_step() {
    let model = test_model(&TasksSection::default());
    let batch = test_batch(&[(true, true, true), (true, true, true)], 7);
    let losses = batch_losses(&model, &batch);
    let vars = model.var_store().variables();
    let layer = model.gradnorm_layer();
    assert!(layer.equal(&vars["backbone.layer4.0.downsample.0.weight"]));
    let norm_at = |loss: &Tensor, at: &Tensor| {
        let g = Tensor::run_backward(&[loss], &[at], true, true).remove(0);
        if g.defined() {
            g.norm().double_value(&[])
        } else {
            0.0
        }
    };
    for (task, loss) in losses.iter() {
        assert!(norm_at(loss, &layer) > 0.0, "{} does not reach the GradNorm layer", task.name());
    }
    // Why not the alternatives: classification never reaches the FPN, and the last conv of a
    // residual branch sits behind a norm whose scale starts at 0.
    assert_eq!(norm_at(losses.cls.as_ref().unwrap(), &vars["neck.output.2.weight"]), 0.0);
    assert_eq!(norm_at(losses.seg.as_ref().unwrap(), &vars["backbone.layer4.0.conv2.weight"]), 0.0);
}

#[test]
fn a_wrong_sized_input_is_an_error_naming_the_layer() {
    let model = test_model(&TasksSection::default());
    let gray = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
    let err = model.forward(&gray, false).unwrap_err().to_string();
    assert!(err.starts_with("model input") && err.contains("[2, 1, 32, 32]"), "{err}");
    assert!(predict(&model, &gray).is_err());
    // C5 with the wrong channel count reaches the classification head: LibTorch's shape error,
    // named.
    let c5 = Tensor::zeros([2, 5, 1, 1], (Kind::Float, Device::Cpu));
    let err = model.cls.as_ref().unwrap().forward(&c5).unwrap_err().to_string();
    assert!(err.starts_with("classification head: "), "{err}");
}
