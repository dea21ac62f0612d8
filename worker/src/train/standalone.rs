//! `worker train --standalone`: the whole job in one process, no coordinator. The same
//! trainer, sharding and evaluation as distributed training with a world of one, so it is
//! where users debug first.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use mtl_job::sharding::{self, TrainShard};
use mtl_job::JobConfig;

use super::epochs::{self, Driver};
use super::{checkpoint, LocalCollective, StepReport, Trainer};
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
    /// Training images skipped because they could not be read.
    pub skipped_images: usize,
    /// Seconds spent training (loading and steps; evaluations excluded).
    pub train_seconds: f64,
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

    /// An evaluation loader (letterbox, no randomness) over the samples `ids` of this split.
    pub fn eval_loader(&self, ids: &[u64], cfg: &JobConfig) -> Result<Loader, WorkerError> {
        let batch_size = cfg.train.batch_size as usize;
        let loader_cfg = LoaderConfig::from_section(&cfg.data, batch_size, false, cfg.job.seed, 0);
        Loader::new(self.dataset.clone(), ids, loader_cfg)
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
    let (train, val, model) = open_job(cfg, device)?;
    let info = train.dataset.info.clone();
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective))?;
    let mut driver = Local { cfg, val, quiet, last: BTreeMap::new() };
    driver.evaluate(&trainer, 0)?;
    let initial = driver.last.clone();
    let outcome = epochs::train(cfg, &mut trainer, &train, &mut driver)?;
    tracing::info!(
        steps = trainer.steps_done(),
        epochs = outcome.epochs,
        train_seconds = format!("{:.1}", outcome.train_seconds),
        "training finished"
    );
    if let Some(dir) = out {
        checkpoint::save(&dir, &trainer.model, cfg, &info)?;
        tracing::info!(dir = %dir.display(), "model saved");
    }
    Ok(Summary {
        initial,
        last: driver.last,
        steps: trainer.steps_done(),
        skipped_images: outcome.skipped_images,
        train_seconds: outcome.train_seconds,
    })
}

/// Shards computed in-process, progress logged, evaluations on the whole validation split.
struct Local<'a> {
    cfg: &'a JobConfig,
    val: Option<OrderedSplit>,
    quiet: bool,
    /// The latest evaluation (empty without a validation split).
    last: BTreeMap<String, f64>,
}

impl Driver for Local<'_> {
    fn train_shard(&mut self, epoch: u64, train: &OrderedSplit) -> Result<TrainShard, WorkerError> {
        let (n, seed) = (train.ids.len() as u64, self.cfg.job.seed);
        Ok(sharding::train_shard(n, seed, epoch, 0, 1, 0, self.cfg.train.batch_size))
    }

    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        images_per_s: Option<f64>,
    ) -> Result<(), WorkerError> {
        if let Some(rate) = images_per_s {
            let values = key_values(report.scalars().iter().map(|(k, v)| (k.as_str(), *v)));
            let images_per_s = format!("{rate:.1}");
            tracing::info!(epoch, step = report.step, images_per_s, values, "train");
        }
        Ok(())
    }

    fn evaluate(&mut self, trainer: &Trainer, _epoch: u64) -> Result<(), WorkerError> {
        let Some(val) = &self.val else { return Ok(()) };
        let loader = val.eval_loader(&val.ids, self.cfg)?;
        self.last = trainer.evaluate(loader, &val.dataset.info)?.finish().to_map();
        let step = trainer.steps_done();
        let values = key_values(self.last.iter().map(|(k, v)| (k.as_str(), *v)));
        tracing::info!(step, values, "evaluated");
        // The final evaluation is the command's result, printed by the caller.
        if !self.quiet && step < self.cfg.train.steps {
            let when = if step == 0 { "untrained model".to_string() } else { format!("step {step}") };
            eprint!("{when}:\n{}", mtl_metrics::render_table(&self.last));
        }
        Ok(())
    }
}

/// `k=v k=v ...` with four decimals, for one log line.
fn key_values<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> String {
    pairs.map(|(k, v)| format!("{k}={v:.4}")).collect::<Vec<_>>().join(" ")
}
