//! `worker train --standalone`: the whole job in one process, no coordinator. The same
//! trainer, sharding and evaluation as distributed training with a world of one, so it is
//! where users debug first.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mtl_job::{sharding, JobConfig};

use super::{checkpoint, LocalCollective, Trainer};
use crate::data::{open_dataset, Dataset, Loader, LoaderConfig, Split};
use crate::model::MultiTaskModel;
use crate::WorkerError;

/// The result of a standalone run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Metrics of the untrained model on the validation split (empty without one).
    pub initial: BTreeMap<String, f64>,
    /// Metrics after training.
    pub last: BTreeMap<String, f64>,
    /// Optimizer steps run.
    pub steps: u64,
    /// Images skipped because they could not be read.
    pub skipped_images: usize,
}

/// A split opened and put in canonical order (sorted ids), as positions refer to it.
pub struct OrderedSplit {
    /// The dataset.
    pub dataset: Arc<Dataset>,
    /// Sample ids sorted ascending: position p is `ids[p]`.
    pub ids: Vec<u64>,
}

impl OrderedSplit {
    /// Orders a dataset.
    pub fn new(dataset: Dataset) -> Self {
        let mut ids = dataset.ids();
        ids.sort_unstable();
        Self { dataset: Arc::new(dataset), ids }
    }

    /// Sample ids at the given positions.
    pub fn ids_at(&self, positions: &[u64]) -> Vec<u64> {
        positions.iter().map(|&p| self.ids[p as usize]).collect()
    }

    /// A fingerprint of the index (count and ids), so ranks can check they see the same data.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over the sorted ids: cheap, stable across platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for id in &self.ids {
            for b in id.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }
}

/// The job's training split, its validation split (if configured) and a fresh model for them.
pub fn open_job(
    cfg: &JobConfig,
    device: tch::Device,
) -> Result<(OrderedSplit, Option<OrderedSplit>, MultiTaskModel), WorkerError> {
    let seed = cfg.job.seed;
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, seed)?.ok_or_else(|| {
        WorkerError::Model { key: "data.train".into(), message: "no training split configured".into() }
    })?);
    let val = open_dataset(&cfg.data, Split::Val, seed)?.map(OrderedSplit::new);
    // The initial weights follow `job.seed` (ranks then take rank 0's anyway).
    tch::manual_seed(seed as i64);
    let model = MultiTaskModel::new(&cfg.model, &cfg.tasks, &train.dataset.info, device)?;
    Ok((train, val, model))
}

/// Trains `cfg` on `device`, evaluating before, every `train.eval_every_steps` and at the end;
/// saves the final model to `out` when given.
pub fn run(
    cfg: &JobConfig,
    device: tch::Device,
    out: Option<PathBuf>,
    quiet: bool,
) -> Result<Summary, WorkerError> {
    let seed = cfg.job.seed;
    let (train, val, model) = open_job(cfg, device)?;
    let info = train.dataset.info.clone();
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective))?;
    let batch_size = cfg.train.batch_size;

    let evaluate = |trainer: &Trainer| -> Result<BTreeMap<String, f64>, WorkerError> {
        let Some(val) = &val else { return Ok(BTreeMap::new()) };
        let loader = Loader::new(
            val.dataset.clone(),
            &val.ids,
            LoaderConfig::from_section(&cfg.data, batch_size as usize, false, seed, 0),
        )?;
        Ok(trainer.evaluate(loader, &info)?.finish().to_map())
    };
    let initial = evaluate(&trainer)?;
    if !quiet && !initial.is_empty() {
        eprint!("untrained model:\n{}", mtl_metrics::render_table(&initial));
    }

    let n = train.ids.len() as u64;
    let mut skipped = 0;
    let mut last = initial.clone();
    let mut epoch = 0;
    let mut meter = super::Throughput::default();
    while trainer.steps_done() < cfg.train.steps {
        let shard = sharding::train_shard(n, seed, epoch, 0, 1, 0, batch_size);
        if shard.steps == 0 {
            return Err(WorkerError::Model {
                key: "train.batch_size".into(),
                message: format!("{batch_size} is larger than the training split ({n} samples)"),
            });
        }
        let ids = train.ids_at(&shard.positions);
        let mut loader = Loader::new(
            train.dataset.clone(),
            &ids,
            LoaderConfig::from_section(&cfg.data, batch_size as usize, true, seed, epoch),
        )?;
        for batch in loader.by_ref() {
            if trainer.steps_done() >= cfg.train.steps {
                break;
            }
            let batch = batch?;
            let step = trainer.steps_done() + 1;
            let log = step % cfg.train.log_every_steps.max(1) == 0 || step == cfg.train.steps;
            let report = trainer.step(&batch)?;
            meter.add(report.samples);
            if log {
                let values: String = report.scalars().iter().map(|(k, v)| format!("{k}={v:.4} ")).collect();
                let images_per_s = format!("{:.1}", meter.rate());
                tracing::info!(epoch, step, images_per_s, values = values.trim_end(), "train");
            }
            let every = cfg.train.eval_every_steps;
            if every > 0 && step % every == 0 && step < cfg.train.steps {
                last = evaluate(&trainer)?;
                if !quiet {
                    eprint!("step {step}:\n{}", mtl_metrics::render_table(&last));
                }
                meter.restart();
            }
        }
        skipped += loader.summary().skipped.len();
        epoch += 1;
    }
    if skipped > 0 {
        tracing::warn!(skipped, "images could not be read and were skipped");
    }
    if val.is_some() {
        last = evaluate(&trainer)?;
    }
    if let Some(dir) = out {
        checkpoint::save(&dir, &trainer.model, cfg, &info)?;
        tracing::info!(dir = %dir.display(), "model saved");
    }
    Ok(Summary { initial, last, steps: trainer.steps_done(), skipped_images: skipped })
}
