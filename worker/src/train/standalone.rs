//! `worker train --standalone`: the whole job in one process, no coordinator. The same
//! trainer, sharding and evaluation as distributed training with a world of one, so it is
//! where users debug first. It writes checkpoints into `checkpoint.dir` (every
//! `checkpoint.every_steps`, at a planned stop and at the end), prunes them itself, and
//! resumes from one exactly.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_job::sharding::{self, TrainShard};
use mtl_job::JobConfig;

use super::checkpoint::{self, Record};
use super::epochs::{self, Driver, Position};
use super::job::open_job;
use super::{Rates, StepReport, StepValues, Trainer};
use crate::collective::LocalCollective;
use crate::data::{DatasetInfo, OrderedSplit};
use crate::WorkerError;

/// How a standalone run starts and stops, and where else its final checkpoint goes.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also write the final checkpoint to this directory when training finishes (`--out`).
    pub out: Option<PathBuf>,
    /// Continue from the newest complete checkpoint in this directory, or from this
    /// checkpoint (`--resume`).
    pub resume: Option<PathBuf>,
    /// Stop after this step and write a checkpoint there: a planned stop (`--stop-at-step`).
    pub stop_at_step: Option<u64>,
}

/// Progress of a standalone run, as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step finished, in `epoch`.
    Step {
        /// The epoch of the step.
        epoch: u64,
        /// What the step did (on the device: [`StepReport::read`] makes the host wait).
        report: &'a StepReport,
        /// The report as the loop read it, on the steps where it did (log steps among them).
        values: Option<&'a StepValues>,
    },
    /// The model was evaluated after `step` steps.
    Evaluated {
        /// Steps taken.
        step: u64,
        /// The validation metrics.
        metrics: &'a BTreeMap<String, f64>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// What was written.
        written: &'a checkpoint::Written,
    },
}

/// The result of a standalone run.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Metrics on the validation split before this run's first step (of the untrained model,
    /// or of the resumed one); empty without a validation split.
    pub initial: BTreeMap<String, f64>,
    /// Metrics after training (the latest evaluation after a planned stop).
    pub last: BTreeMap<String, f64>,
    /// Optimizer steps taken in all (resumed ones included).
    pub steps: u64,
    /// Training images skipped because they could not be read.
    pub skipped_images: usize,
    /// Seconds spent training (loading and steps; evaluations excluded).
    pub train_seconds: f64,
    /// The last checkpoint written, if any.
    pub checkpoint: Option<PathBuf>,
}

/// Trains `cfg` on `device`, from scratch or from `opts.resume`, evaluating before, every
/// `train.eval_every_steps` and at the end; every step, evaluation and checkpoint goes to
/// `on_event`.
///
/// A run from scratch refuses a `checkpoint.dir` that already holds checkpoints: they belong
/// to an earlier run, which `--resume` continues.
pub fn run(
    cfg: &JobConfig,
    device: tch::Device,
    opts: &Options,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Summary, WorkerError> {
    let (train, val, model) = open_job(cfg, device)?;
    let dir = cfg.checkpoint.dir_path(&cfg.job.name);
    let mut trainer = Trainer::new(cfg, model, Box::new(LocalCollective))?.with_cuda_graphs(&cfg.train)?;
    let start = match &opts.resume {
        Some(from) => checkpoint::open(from)?.restore(&mut trainer, cfg, &train)?,
        None => {
            if let Some((step, _)) = checkpoint::list(&dir)?.last() {
                return Err(WorkerError::Checkpoint {
                    path: dir,
                    message: format!(
                        "`checkpoint.dir` already holds checkpoints of an earlier run (newest step-{step}): \
                         continue it with --resume, or set checkpoint.dir to an empty directory"
                    ),
                });
            }
            Position::default()
        }
    };
    let info = train.dataset.info.clone();
    let mut driver = Local { cfg, val, info, dir, on_event, last: None, written: None };
    driver.evaluate(&trainer, start.epoch)?;
    let initial = driver.last.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
    let outcome = epochs::train(cfg, &mut trainer, &train, start, opts.stop_at_step, &mut driver)?;
    if let (Some(out), true) = (&opts.out, trainer.steps_done() >= cfg.train.steps) {
        driver.write(&trainer, &train, outcome.position, Some(out))?;
    }
    tracing::info!(
        steps = trainer.steps_done(),
        epochs = outcome.epochs,
        train_seconds = format!("{:.1}", outcome.train_seconds),
        "training {}",
        if trainer.steps_done() < cfg.train.steps { "stopped" } else { "finished" }
    );
    Ok(Summary {
        initial,
        last: driver.last.map(|(_, m)| m).unwrap_or_default(),
        steps: trainer.steps_done(),
        skipped_images: outcome.skipped_images,
        train_seconds: outcome.train_seconds,
        checkpoint: driver.written,
    })
}

/// Shards computed in-process, progress logged, evaluations on the whole validation split,
/// checkpoints written and pruned here.
struct Local<'a> {
    cfg: &'a JobConfig,
    val: Option<OrderedSplit>,
    info: DatasetInfo,
    /// `checkpoint.dir`.
    dir: PathBuf,
    on_event: &'a mut dyn FnMut(Event<'_>),
    /// The latest evaluation and the step it ran after.
    last: Option<(u64, BTreeMap<String, f64>)>,
    /// The latest checkpoint written.
    written: Option<PathBuf>,
}

impl Local<'_> {
    /// Writes a checkpoint of `trainer` to `path` (or to `step-<N>/` in `checkpoint.dir`).
    fn write(
        &mut self,
        trainer: &Trainer,
        train: &OrderedSplit,
        next: Position,
        path: Option<&Path>,
    ) -> Result<checkpoint::Written, WorkerError> {
        let step = trainer.steps_done();
        let metrics = self.last.as_ref().filter(|(at, _)| *at == step).map(|(_, m)| m);
        let record = Record { cfg: self.cfg, info: &self.info, train, next, generation: 0, metrics };
        let written = match path {
            Some(path) => checkpoint::write_at(path, trainer, &record)?,
            None => checkpoint::write_step(&self.dir, trainer, &record)?,
        };
        tracing::info!(path = %written.path.display(), step, "checkpoint written");
        (self.on_event)(Event::Checkpoint { written: &written });
        Ok(written)
    }
}

impl Driver for Local<'_> {
    fn train_shard(
        &mut self,
        epoch: u64,
        consumed: u64,
        train: &OrderedSplit,
    ) -> Result<TrainShard, WorkerError> {
        Ok(sharding::train_shard(sharding::ShardSpec {
            samples: train.ids.len() as u64,
            seed: self.cfg.job.seed,
            epoch,
            consumed,
            world_size: 1,
            rank: 0,
            batch_size: self.cfg.train.batch_size,
        }))
    }

    fn after_step(
        &mut self,
        epoch: u64,
        report: &StepReport,
        values: Option<&StepValues>,
        rates: Option<Rates>,
    ) -> Result<(), WorkerError> {
        if let (Some(read), Some(rates)) = (values, rates) {
            let values = key_values(read.scalars().iter().map(|(k, v)| (k.as_str(), *v)));
            let (images_per_s, loader_wait_ms, step_ms) = (
                format!("{:.1}", rates.images_per_s),
                format!("{:.1}", rates.loader_wait_ms),
                format!("{:.1}", rates.step_ms),
            );
            tracing::info!(epoch, step = report.step, images_per_s, loader_wait_ms, step_ms, values, "train");
        }
        (self.on_event)(Event::Step { epoch, report, values });
        Ok(())
    }

    fn evaluate(&mut self, trainer: &Trainer, _epoch: u64) -> Result<(), WorkerError> {
        let Some(val) = &self.val else { return Ok(()) };
        let loader = val.eval_loader(&val.ids, self.cfg)?;
        let metrics = trainer.evaluate(loader, &val.dataset.info)?.finish().to_map();
        let step = trainer.steps_done();
        let values = key_values(metrics.iter().map(|(k, v)| (k.as_str(), *v)));
        tracing::info!(step, values, "evaluated");
        (self.on_event)(Event::Evaluated { step, metrics: &metrics });
        self.last = Some((step, metrics));
        Ok(())
    }

    fn checkpoint(
        &mut self,
        trainer: &Trainer,
        train: &OrderedSplit,
        next: Position,
    ) -> Result<(), WorkerError> {
        let written = self.write(trainer, train, next, None)?;
        self.written = Some(written.path);
        for path in checkpoint::prune(&self.dir, &self.cfg.checkpoint)? {
            tracing::info!(path = %path.display(), "checkpoint pruned");
        }
        Ok(())
    }
}

/// `k=v k=v ...` with four decimals, for one log line.
fn key_values<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> String {
    pairs.map(|(k, v)| format!("{k}={v:.4}")).collect::<Vec<_>>().join(" ")
}
