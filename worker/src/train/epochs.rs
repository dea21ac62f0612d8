//! The epoch loop both training modes share: take this rank's shard of an epoch, step through
//! it, log every `train.log_every_steps`, evaluate every `train.eval_every_steps` and once at
//! the end; after an epoch's last step the trainer ends the epoch (DWA's weights move there).
//! Where shards come from and where progress goes is the [`Driver`]'s business: the process
//! itself for `worker train --standalone`, the coordinator for `worker run`.
use mtl_job::sharding::TrainShard;
use mtl_job::JobConfig;

use super::{StepReport, Throughput, Trainer};
use crate::data::OrderedSplit;
use crate::data::{Loader, LoaderConfig};
use crate::WorkerError;

/// The mode-specific half of a training run.
pub trait Driver {
    /// Positions (into the ordered training split) this rank trains on in `epoch`, in order.
    fn train_shard(&mut self, epoch: u64, train: &OrderedSplit) -> Result<TrainShard, WorkerError>;

    /// Called before every step; an error ends the run (a stop requested from outside).
    fn before_step(&mut self) -> Result<(), WorkerError> {
        Ok(())
    }

    /// Called after every step with its report; `images_per_s` (since the last logging step)
    /// is given on logging steps only.
    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        images_per_s: Option<f64>,
    ) -> Result<(), WorkerError>;

    /// Evaluates the current model on the validation split and publishes the result.
    fn evaluate(&mut self, trainer: &Trainer, epoch: u64) -> Result<(), WorkerError>;
}

/// What a run of [`train`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Epochs started.
    pub epochs: u64,
    /// Training images skipped because they could not be read.
    pub skipped_images: usize,
    /// Seconds spent training (loading and steps; evaluations excluded).
    pub train_seconds: f64,
}

/// Trains until `train.steps`, then evaluates once more.
pub fn train(
    cfg: &JobConfig,
    trainer: &mut Trainer,
    train: &OrderedSplit,
    driver: &mut dyn Driver,
) -> Result<Outcome, WorkerError> {
    let batch_size = cfg.train.batch_size as usize;
    let mut epoch = 0;
    let mut skipped = 0;
    let mut meter = Throughput::default();
    let mut train_time = std::time::Duration::ZERO;
    let mut since = std::time::Instant::now();
    while trainer.steps_done() < cfg.train.steps {
        let shard = driver.train_shard(epoch, train)?;
        if shard.steps == 0 {
            return Err(WorkerError::Data {
                key: "train.batch_size".into(),
                message: format!(
                    "{} rank(s) x batch {batch_size} is more than the training split ({} samples)",
                    trainer.world_size(),
                    train.ids.len()
                ),
            });
        }
        let ids = train.ids_at(&shard.positions);
        let mut loader = Loader::new(
            train.dataset.clone(),
            &ids,
            LoaderConfig::from_section(&cfg.data, batch_size, true, cfg.job.seed, epoch),
        )?;
        let mut epoch_steps = 0;
        for batch in loader.by_ref().take(shard.steps as usize) {
            if trainer.steps_done() >= cfg.train.steps {
                break;
            }
            epoch_steps += 1;
            driver.before_step()?;
            let step = trainer.steps_done() + 1;
            let report = trainer.step(&batch?)?;
            meter.add(report.samples);
            let log = step.is_multiple_of(cfg.train.log_every_steps.max(1)) || step == cfg.train.steps;
            driver.after_step(epoch, &report, log.then(|| meter.rate()))?;
            let every = cfg.train.eval_every_steps;
            if every > 0 && step.is_multiple_of(every) && step < cfg.train.steps {
                train_time += since.elapsed();
                driver.evaluate(trainer, epoch)?;
                meter.restart();
                since = std::time::Instant::now();
            }
        }
        // Every rank runs the same number of steps of a shard, so all end the epoch together.
        if epoch_steps == shard.steps {
            trainer.end_epoch();
        }
        skipped += loader.summary().skipped.len();
        epoch += 1;
    }
    train_time += since.elapsed();
    if skipped > 0 {
        tracing::warn!(skipped, "training images could not be read and were skipped");
    }
    driver.evaluate(trainer, epoch)?;
    Ok(Outcome { epochs: epoch, skipped_images: skipped, train_seconds: train_time.as_secs_f64() })
}
