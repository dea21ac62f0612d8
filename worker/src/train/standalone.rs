//! `worker train --standalone`: the whole job in one process, no coordinator. The same
//! trainer, sharding and evaluation as distributed training with a world of one, so it is
//! where users debug first.
use std::collections::BTreeMap;
use std::path::PathBuf;

use mtl_job::sharding::{self, TrainShard};
use mtl_job::JobConfig;

use super::epochs::{self, Driver};
use super::job::open_job;
use super::{checkpoint, StepReport, Trainer};
use crate::collective::LocalCollective;
use crate::data::OrderedSplit;
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

/// Trains `cfg` on `device`, evaluating before, every `train.eval_every_steps` and at the end
/// (each evaluation's metrics go to `on_eval` with the step); saves the final model to `out`
/// when given.
pub fn run(
    cfg: &JobConfig,
    device: tch::Device,
    out: Option<PathBuf>,
    on_eval: &mut dyn FnMut(u64, &BTreeMap<String, f64>),
) -> Result<Summary, WorkerError> {
    let (train, val, model) = open_job(cfg, device)?;
    let info = train.dataset.info.clone();
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective))?;
    let mut driver = Local { cfg, val, on_eval, last: BTreeMap::new() };
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
    on_eval: &'a mut dyn FnMut(u64, &BTreeMap<String, f64>),
    /// The latest evaluation (empty without a validation split).
    last: BTreeMap<String, f64>,
}

impl Driver for Local<'_> {
    fn train_shard(&mut self, epoch: u64, train: &OrderedSplit) -> Result<TrainShard, WorkerError> {
        Ok(sharding::train_shard(sharding::ShardSpec {
            samples: train.ids.len() as u64,
            seed: self.cfg.job.seed,
            epoch,
            consumed: 0,
            world_size: 1,
            rank: 0,
            batch_size: self.cfg.train.batch_size,
        }))
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
        (self.on_eval)(step, &self.last);
        Ok(())
    }
}

/// `k=v k=v ...` with four decimals, for one log line.
fn key_values<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> String {
    pairs.map(|(k, v)| format!("{k}={v:.4}")).collect::<Vec<_>>().join(" ")
}
