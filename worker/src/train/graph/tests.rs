//! `train.cuda_graphs`. The capture itself needs a GPU: those tests return early without CUDA
//! and fail when `MTL_REQUIRE_CUDA` is set (bench/gpu_check.sh runs them on a GPU machine).
use std::path::Path;

use mtl_job::JobConfig;
use tch::{Device, Tensor};

use super::super::job::open_job;
use super::super::{losses, StepInputs, StepValues, Trainer};
use super::{StaticInputs, WARMUP_STEPS};
use crate::collective::LocalCollective;
use crate::data::{Batch, Loader, LoaderConfig};
use crate::model::MultiTaskModel;
use crate::optim::Lr;
use crate::task::Task;

const BATCH: usize = 8;

fn job(dir: &Path, extra: &str) -> JobConfig {
    let text = format!(
        r#"
[job]
name = "graphs"
seed = 3
[data]
format = "synthetic"
train = "{}"
synthetic_n = 64
synthetic_size = 32
synthetic_val_fraction = 0.25
image_size = 32
loader_threads = 1
[model]
backbone = "tiny"
norm = "batch"
[train]
steps = 20
batch_size = {BATCH}
lr = 0.01
clip_grad_norm = 1.0
cudnn_benchmark = false
{extra}
"#,
        dir.display()
    );
    JobConfig::from_toml(&text).expect("test job")
}

/// CUDA device 0, or `None` (after checking that `MTL_REQUIRE_CUDA` does not ask for one).
fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    assert!(
        std::env::var_os("MTL_REQUIRE_CUDA").is_none(),
        "MTL_REQUIRE_CUDA is set but CUDA is not available"
    );
    None
}

#[test]
fn cuda_graphs_on_a_cpu_trainer_are_refused_before_any_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "cuda_graphs = true");
    let (_, _, model) = open_job(&cfg, Device::Cpu).unwrap();
    let err = Trainer::new(&cfg, model, Box::new(LocalCollective))
        .and_then(|t| t.with_cuda_graphs(&cfg.train))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("train.cuda_graphs") && err.contains("CUDA device"), "{err}");
}

/// The job's batches on `device`: full ones through two epochs, then one of half a batch, then
/// one full one more (a replay after an eager step).
fn batches(cfg: &JobConfig, device: Device, model: &MultiTaskModel) -> Vec<Batch> {
    let (train, _, _) = open_job(cfg, Device::Cpu).unwrap();
    let loader_cfg = LoaderConfig::from_section(&cfg.data, BATCH, true, cfg.job.seed, 0).for_training(model);
    let full_ids = &train.ids[..(train.ids.len() / BATCH) * BATCH];
    let mut out = Vec::new();
    for _ in 0..2 {
        for b in Loader::new(train.dataset.clone(), full_ids, loader_cfg.clone()).unwrap() {
            out.push(b.unwrap().to_device(device).unwrap());
        }
    }
    let half = Loader::new(train.dataset.clone(), &train.ids[..BATCH / 2], loader_cfg.clone()).unwrap();
    out.extend(half.map(|b| b.unwrap().to_device(device).unwrap()));
    let one = Loader::new(train.dataset.clone(), &train.ids[..BATCH], loader_cfg).unwrap();
    out.extend(one.map(|b| b.unwrap().to_device(device).unwrap()));
    out
}

/// A trainer on a copy of `initial`.
fn trainer(cfg: &JobConfig, initial: &MultiTaskModel) -> Trainer {
    let (_, _, mut model) = open_job(cfg, initial.var_store().device()).unwrap();
    model.var_store_mut().copy(initial.var_store()).unwrap();
    Trainer::new(cfg, model, Box::new(LocalCollective)).unwrap()
}

/// Trains on `batches` with `cfg` from `initial`'s weights; the reports read after each step,
/// the final parameters, and whether a graph was captured.
fn train(
    cfg: &JobConfig,
    initial: &MultiTaskModel,
    batches: &[Batch],
) -> (Vec<StepValues>, Vec<Tensor>, bool) {
    let mut trainer = trainer(cfg, initial).with_cuda_graphs(&cfg.train).unwrap();
    let mut reports = Vec::new();
    for batch in batches {
        reports.push(trainer.step(batch).unwrap().read().unwrap());
    }
    assert_eq!(trainer.steps_done(), batches.len() as u64);
    let captured = trainer.graph.as_ref().is_some_and(|g| g.captured.is_some());
    let params = trainer.model.parameters().into_iter().map(|(_, t)| t.to_device(Device::Cpu)).collect();
    (reports, params, captured)
}

/// Replays of the captured step train as eager steps do (same losses step by step, same final
/// parameters within float tolerance): every input reaches the graph through its static tensors
/// and the learning rate through its device scalar, and each report holds its own step's values.
#[test]
fn a_captured_step_trains_as_eager_steps_do_on_cuda() {
    let Some(device) = cuda() else { return };
    for extra in ["", "optimizer = \"adamw\"\n[weighting]\nstrategy = \"uncertainty\""] {
        let dir = tempfile::tempdir().unwrap();
        let eager_cfg = job(dir.path(), extra);
        let graphed_cfg = job(dir.path(), &format!("cuda_graphs = true\n{extra}"));
        let (_, _, initial) = open_job(&eager_cfg, device).unwrap();
        let batches = batches(&eager_cfg, device, &initial);
        assert!(batches.len() > WARMUP_STEPS as usize + 4, "{} batches", batches.len());
        let (want, want_params, _) = train(&eager_cfg, &initial, &batches);
        let (got, got_params, captured) = train(&graphed_cfg, &initial, &batches);
        assert!(captured, "{extra:?}: the step was not captured");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!((g.step, g.samples), (w.step, w.samples), "{extra:?} step {i}");
            assert!((g.lr - w.lr).abs() < 1e-12, "{extra:?} step {i}: lr");
            for task in Task::ALL {
                let (a, b) = (g.losses.value(task).unwrap(), w.losses.value(task).unwrap());
                assert!(
                    (a - b).abs() <= 1e-3 * b.abs() + 1e-4,
                    "{extra:?} step {i} {}: {a} vs {b}",
                    task.name()
                );
            }
        }
        // Replays report their own step: the losses move from one step to the next.
        let det: Vec<f64> = got.iter().map(|v| v.losses.value(Task::Detection).unwrap()).collect();
        assert!(det.windows(2).skip(WARMUP_STEPS as usize).all(|w| w[0] != w[1]), "{det:?}");
        for (g, w) in got_params.iter().zip(&want_params) {
            let diff = (g - w).abs().max().double_value(&[]);
            let scale = w.abs().max().double_value(&[]).max(1.0);
            assert!(diff <= 1e-3 * scale, "{extra:?}: parameters differ by {diff}");
        }
        assert!(got_params.iter().all(|p| p.isfinite().all().int64_value(&[]) == 1));
    }
}

/// What a replay does, run eagerly on the CPU: a step on the static inputs, after another
/// batch and learning rate were loaded into them, trains exactly as a step on that batch and
/// rate (up to the rate's f32 rounding). So every input reaches the step through the static
/// tensors (nothing of the batch they were copied from stays) and the rate through its scalar;
/// a batch of another size does not load.
#[test]
fn a_step_on_static_inputs_trains_as_a_step_on_the_batch_loaded_into_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job(dir.path(), "optimizer = \"adamw\"");
    let (_, _, initial) = open_job(&cfg, Device::Cpu).unwrap();
    let batches = batches(&cfg, Device::Cpu, &initial);
    let (mut eager, mut statics_trainer) = (trainer(&cfg, &initial), trainer(&cfg, &initial));
    let prepared: Vec<(losses::Targets, Tensor)> = batches
        .iter()
        .map(|b| {
            let targets = losses::build_targets(&eager.model, b).unwrap();
            let host_known = losses::host_known_counts(b, &targets, false).unwrap();
            (targets, host_known)
        })
        .collect();
    let inputs = |i: usize, lr: f64| StepInputs {
        batch: &batches[i],
        targets: &prepared[i].0,
        host_known: &prepared[i].1,
        lr,
    };
    let statics = StaticInputs::copy_of(&inputs(0, 0.5)).unwrap();
    for (i, lr) in [(1, 0.01), (2, 0.003), (3, 0.02)] {
        assert!(statics.load(&inputs(i, lr)).unwrap(), "batch {i} fits");
        let got =
            statics_trainer.device_step(&statics.inputs(), Lr::Tensor(&statics.lr)).unwrap().read().unwrap();
        let want = eager.device_step(&inputs(i, lr), Lr::Value(lr)).unwrap().read().unwrap();
        assert_eq!(got.samples, want.samples);
        for task in Task::ALL {
            let (a, b) = (got.losses.value(task).unwrap(), want.losses.value(task).unwrap());
            assert!((a - b).abs() <= 1e-5 * b.abs(), "step on batch {i}, {}: {a} vs {b}", task.name());
        }
    }
    for ((name, a), (_, b)) in statics_trainer.model.parameters().iter().zip(eager.model.parameters()) {
        let diff = (a - &b).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name}: {diff}");
    }
    let half = batches.len() - 2;
    assert_eq!(batches[half].ids.len(), BATCH / 2);
    assert!(!statics.load(&inputs(half, 0.01)).unwrap(), "a half batch does not fit");
}
