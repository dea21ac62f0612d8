//! The epoch loop both training modes share: take this rank's shard of an epoch, step through
//! it, log every `train.log_every_steps`, evaluate every `train.eval_every_steps` and once at
//! the end, offer a checkpoint every `checkpoint.every_steps`, at a planned stop and at the end;
//! after an epoch's last step the trainer ends the epoch (DWA's weights move there). A run
//! fails when an epoch's unreadable images pass `data.max_unreadable_fraction` (`unreadable`).
//! Where shards come from and where progress and checkpoints go is the [`Driver`]'s business:
//! the process itself for `worker train --standalone`, the coordinator for `worker run`.
//!
//! Reading a step's numbers makes the host wait for the device, so the loop reads them only
//! where it needs them (see the comment in [`train`]): a stop request (SIGTERM) or too many
//! unreadable images act at the next such step, at most `train.log_every_steps` later.
//!
//! The loop tracks its [`Position`] in the data (epoch, samples of the epoch trained), so a
//! run resumed from a checkpoint continues with the very next global batch: the epoch's
//! permutation depends only on (seed, epoch) and augmentation on (seed, epoch, sample id).
use mtl_job::sharding::TrainShard;
use mtl_job::JobConfig;

use super::unreadable::Unreadable;
use super::{Rates, StepReport, StepValues, Throughput, Trainer};
use crate::data::OrderedSplit;
use crate::data::{Loader, LoaderConfig, LoaderPool};
use crate::WorkerError;

/// Where a run stands in its data: training continues with sample `consumed` of `epoch`'s
/// permutation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    /// The epoch (0-based).
    pub epoch: u64,
    /// Samples of the epoch's permutation already trained, over all ranks (a multiple of the
    /// global batch; 0 at the start of an epoch).
    pub consumed: u64,
}

/// The mode-specific half of a training run.
pub(crate) trait Driver {
    /// Positions (into the ordered training split) this rank trains on in `epoch`, in order,
    /// skipping the first `consumed` samples of the epoch (non-zero only right after a resume).
    fn train_shard(
        &mut self,
        epoch: u64,
        consumed: u64,
        train: &OrderedSplit,
    ) -> Result<TrainShard, WorkerError>;

    /// Called before every step; an error ends the run (a stop requested from outside).
    fn before_step(&mut self) -> Result<(), WorkerError> {
        Ok(())
    }

    /// Called after every step with its report. Where the loop read the report (log steps, and
    /// steps where it must decide on a stop, an evaluation, a checkpoint or an epoch's end),
    /// `values` holds what it read; on log steps `rates` holds the speed since the last one.
    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        values: Option<&StepValues>,
        rates: Option<Rates>,
    ) -> Result<(), WorkerError>;

    /// Evaluates the current model on the validation split and publishes the result.
    fn evaluate(&mut self, trainer: &Trainer, epoch: u64) -> Result<(), WorkerError>;

    /// A checkpoint is due after step `trainer.steps_done()`: every `checkpoint.every_steps`,
    /// at a planned stop, and at the end (after the last evaluation). Training continues from
    /// `next` of `train`. The default writes nothing.
    fn checkpoint(
        &mut self,
        _trainer: &Trainer,
        _train: &OrderedSplit,
        _next: Position,
    ) -> Result<(), WorkerError> {
        Ok(())
    }
}

/// What a run of [`train`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Outcome {
    /// Epochs started (entered) by this run.
    pub epochs: u64,
    /// Where the run stopped: the next sample to train.
    pub position: Position,
    /// Training images skipped because they could not be read.
    pub skipped_images: usize,
    /// Seconds spent training (loading and steps; evaluations excluded).
    pub train_seconds: f64,
    /// Stopped on request before the last step (every rank after the same step).
    pub stopped: bool,
}

/// Trains from `start` until `train.steps` (then evaluates once more) or, for a planned stop,
/// until step `stop_at_step`, or until a step reports a stop request (`crate::stop`); offers a
/// checkpoint at the end in every case if a step was taken. The step a stop ends at is not
/// evaluated even when an evaluation is due there: a stop has a deadline.
pub(crate) fn train(
    cfg: &JobConfig,
    trainer: &mut Trainer,
    train: &OrderedSplit,
    start: Position,
    stop_at_step: Option<u64>,
    driver: &mut dyn Driver,
) -> Result<Outcome, WorkerError> {
    let batch_size = cfg.train.batch_size as usize;
    let global_batch = trainer.world_size() as u64 * u64::from(cfg.train.batch_size);
    let until = stop_at_step.map_or(cfg.train.steps, |s| s.min(cfg.train.steps));
    let first_step = trainer.steps_done();
    let mut at = start;
    let mut epochs = 0;
    let mut skipped = 0;
    let mut meter = Throughput::default();
    let mut train_time = std::time::Duration::ZERO;
    let mut since = std::time::Instant::now();
    let mut stopped = false;
    // One pool of loader threads for every epoch of the run.
    let pool = LoaderPool::new(cfg.data.loader_threads as usize)?;
    while trainer.steps_done() < until && !stopped {
        let shard = driver.train_shard(at.epoch, at.consumed, train)?;
        if shard.steps == 0 {
            return Err(WorkerError::Data {
                key: "train.batch_size".into(),
                message: format!(
                    "{} rank(s) x batch {batch_size} is more than the training split ({} samples, {} of epoch {} \
                     already trained)",
                    trainer.world_size(),
                    train.ids.len(),
                    at.consumed,
                    at.epoch
                ),
            });
        }
        epochs += 1;
        let epoch = at.epoch;
        let ids = train.ids_at(&shard.positions);
        let mut loader = Loader::on(
            &pool,
            train.dataset.clone(),
            &ids,
            LoaderConfig::from_section(&cfg.data, batch_size, true, cfg.job.seed, epoch)
                .for_training(&trainer.model),
        )?;
        let planned = shard.steps.min(until.saturating_sub(trainer.steps_done())) * global_batch;
        let mut unreadable = Unreadable::new(cfg.data.max_unreadable_fraction, epoch, planned);
        // Samples trained (a device sum) and attempted since the report was last read.
        let mut unread_samples: Option<tch::Tensor> = None;
        let mut unread_attempted = 0;
        for i in 0..shard.steps as usize {
            if trainer.steps_done() >= until {
                break;
            }
            let waiting = std::time::Instant::now();
            let Some(batch) = loader.next() else { break };
            meter.add_step(waiting.elapsed());
            driver.before_step()?;
            let step = trainer.steps_done() + 1;
            let report = trainer.step(&batch?)?;
            let samples = report.samples()?;
            unread_samples = Some(match unread_samples.take() {
                Some(sum) => sum.f_add(&samples)?,
                None => samples,
            });
            unread_attempted += global_batch;
            let last_of_epoch = i as u64 + 1 == shard.steps;
            let log = step.is_multiple_of(cfg.train.log_every_steps.max(1)) || step == cfg.train.steps;
            let eval_due = |every: u64| every > 0 && step.is_multiple_of(every) && step < cfg.train.steps;
            let evaluate = eval_due(cfg.train.eval_every_steps);
            let every = cfg.checkpoint.every_steps;
            let checkpoint = every > 0 && step.is_multiple_of(every) && step < until;
            // The report is read (the host waits for the device) only where the loop needs its
            // numbers: to log, and before it acts on them (a stop request or the epoch's
            // unreadable images) at a point every rank reaches after the same step: an epoch's
            // first and last steps, evaluations, checkpoints and the end.
            let values = if log || evaluate || checkpoint || i == 0 || last_of_epoch || step >= until {
                let values = report.read()?;
                let trained =
                    super::host_values(&unread_samples.take().expect("summed above"))?[0].round() as u64;
                stopped = values.stop_requested && trainer.steps_done() < until;
                // Every rank counts the same global numbers, so all stop here together.
                unreadable.count(unread_attempted, trained, &loader.summary().skipped)?;
                unread_attempted = 0;
                meter.add_samples(trained);
                Some(values)
            } else {
                None
            };
            // An epoch whose last whole global batch is trained is done: the next sample is
            // the start of the next epoch (its short tail is never trained, see sharding).
            // Every rank runs the same number of steps of a shard, so all end the epoch together
            // (DWA's weights move there), before a checkpoint of this step is taken.
            at = if last_of_epoch {
                trainer.end_epoch()?;
                Position { epoch: epoch + 1, consumed: 0 }
            } else {
                Position { epoch, consumed: at.consumed + global_batch }
            };
            driver.after_step(epoch, &report, values.as_ref(), log.then(|| meter.rates()))?;
            if evaluate && !stopped {
                train_time += since.elapsed();
                driver.evaluate(trainer, epoch)?;
                meter.restart();
                since = std::time::Instant::now();
            }
            if checkpoint && !stopped {
                train_time += since.elapsed();
                driver.checkpoint(trainer, train, at)?;
                meter.restart();
                since = std::time::Instant::now();
            }
            if stopped {
                tracing::warn!(step, "stopping on request after this step");
                break;
            }
        }
        skipped += loader.summary().skipped.len();
        if unreadable.skipped() > 0 {
            tracing::warn!(
                epoch,
                skipped = unreadable.skipped(),
                images = planned,
                "training images of the epoch (all ranks) could not be read and were skipped"
            );
        }
    }
    train_time += since.elapsed();
    if skipped > 0 {
        tracing::warn!(skipped, "training images could not be read and were skipped");
    }
    if trainer.steps_done() >= cfg.train.steps {
        driver.evaluate(trainer, at.epoch)?;
    }
    if trainer.steps_done() > first_step {
        driver.checkpoint(trainer, train, at)?;
    }
    Ok(Outcome {
        epochs,
        position: at,
        skipped_images: skipped,
        train_seconds: train_time.as_secs_f64(),
        stopped,
    })
}
