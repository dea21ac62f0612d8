//! `worker bench-step`: the time of [`Trainer::step`] alone, on batches loaded once through the
//! job's loader and kept on the device, so that it compares with a PyTorch step on pre-made
//! device-resident batches (bench/gpu_compare.sh). Loading, decoding and augmentation are left
//! out on purpose: `worker train --standalone` measures them with the step.
use mtl_job::JobConfig;
use serde::Serialize;

use super::job::open_job;
use super::Trainer;
use crate::collective::LocalCollective;
use crate::data::{Batch, Loader, LoaderConfig};
use crate::WorkerError;

/// How many steps to take, and over how many distinct batches.
#[derive(Debug, Clone, Copy)]
pub struct BenchStepOptions {
    /// Untimed steps first (cuDNN's autotuning and allocator growth happen there).
    pub warmup: u64,
    /// Timed steps.
    pub steps: u64,
    /// Distinct batches loaded (full batches of `train.batch_size`), cycled through.
    pub batches: usize,
}

/// What `worker bench-step` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchStepResult {
    /// Milliseconds per training step (the mean over the timed steps).
    pub ms_per_step: f64,
    /// Training images per second over the timed steps.
    pub images_per_s: f64,
    /// Images per step.
    pub batch_size: u32,
    /// Side of the (square) training images.
    pub image_size: u32,
    /// Timed steps.
    pub steps: u64,
    /// Untimed steps before them.
    pub warmup: u64,
    /// The device, as LibTorch names it.
    pub device: String,
    /// `train.precision`.
    pub precision: String,
    /// `train.channels_last`.
    pub channels_last: bool,
}

/// Builds `cfg`'s model and trainer on `device` (a world of one), loads `opts.batches` batches
/// onto the device, takes `opts.warmup` untimed steps and times `opts.steps` steps. Only the
/// last step's report is read, after the timed loop: the clock stops once the device has
/// finished every step queued.
pub fn run(
    cfg: &JobConfig,
    device: tch::Device,
    opts: &BenchStepOptions,
) -> Result<BenchStepResult, WorkerError> {
    if opts.steps == 0 {
        return Err(WorkerError::Data { key: "--steps".into(), message: "must be at least 1".into() });
    }
    let (train, _, model) = open_job(cfg, device)?;
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective))?.with_cuda_graphs(&cfg.train)?;
    let batch_size = cfg.train.batch_size as usize;
    let wanted = opts.batches.max(1) * batch_size;
    if train.ids.len() < batch_size {
        return Err(WorkerError::Data {
            key: "train.batch_size".into(),
            message: format!("{batch_size} is more than the training split ({} samples)", train.ids.len()),
        });
    }
    let ids = &train.ids[..wanted.min(train.ids.len())];
    // As the epoch loop's loaders: FCOS targets built with the batch (not in the step), pinned
    // host memory on a GPU.
    let loader_cfg =
        LoaderConfig::from_section(&cfg.data, batch_size, true, cfg.job.seed, 0).for_training(&trainer.model);
    let mut batches: Vec<Batch> = Vec::new();
    for batch in Loader::new(train.dataset.clone(), ids, loader_cfg)? {
        let batch = batch?;
        // Full batches only: every timed step has the same shapes.
        if batch.ids.len() == batch_size {
            batches.push(batch.to_device(device)?);
        }
    }
    if batches.is_empty() {
        return Err(WorkerError::Data {
            key: "data.train".into(),
            message: format!("no full batch of {batch_size} readable images among the first {}", ids.len()),
        });
    }
    let mut at = batches.iter().cycle();
    let mut next = || at.next().expect("a cycle over a non-empty list");
    for _ in 0..opts.warmup {
        trainer.step(next())?;
    }
    // Wait for the warm-up's work before starting the clock.
    synchronize(device);
    let start = std::time::Instant::now();
    let mut last = None;
    for _ in 0..opts.steps {
        last = Some(trainer.step(next())?);
    }
    // Reading the report queues a copy behind every step's kernels; then nothing is left.
    let values = last.expect("at least one timed step").read()?;
    synchronize(device);
    let seconds = start.elapsed().as_secs_f64();
    if values.losses.iter().any(|(_, l)| !l.is_finite()) {
        return Err(WorkerError::Data {
            key: "data.train".into(),
            message: format!("the last step's losses are not finite: {:?}", values.losses),
        });
    }
    Ok(BenchStepResult {
        ms_per_step: seconds * 1000.0 / opts.steps as f64,
        images_per_s: (opts.steps as usize * batch_size) as f64 / seconds,
        batch_size: cfg.train.batch_size,
        image_size: cfg.data.image_size,
        steps: opts.steps,
        warmup: opts.warmup,
        device: format!("{device:?}"),
        precision: format!("{:?}", cfg.train.precision).to_lowercase(),
        channels_last: cfg.train.channels_last,
    })
}

/// Waits for every kernel queued on a CUDA device; nothing to wait for on CPU.
fn synchronize(device: tch::Device) {
    if let tch::Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
