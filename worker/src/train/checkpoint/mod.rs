//! Checkpoints: a run's complete state on disk, to resume it exactly, evaluate it or export
//! its model.
//!
//! A checkpoint is a directory, `step-<N>/` in `checkpoint.dir` (or any path for `--out`):
//! - `model.safetensors`: every variable of the network (parameters and BatchNorm running
//!   statistics), named as in its `VarStore` (`backbone.conv1.weight`, `heads.seg.out.bias`);
//! - `optimizer.safetensors`: the optimizer's state (`<param>.momentum_buffer`, or
//!   `<param>.exp_avg`, `<param>.exp_avg_sq`, `<param>.step`; and `step`);
//! - `weighting.safetensors`: the task weighting's state (`weighting.log_var`, DWA's loss
//!   history, GradNorm's weights, PCGrad's step; no entries for fixed weights);
//! - `state.json` ([`Meta`]): step (also the learning-rate schedule's position), the epoch and
//!   how many of its samples are trained, generation, world size, the job's config hash, the
//!   training split's size and fingerprint, and the evaluation at that step if one ran;
//! - `job.toml` (the job, without its token) and `dataset.json` (the label spaces);
//! - `manifest.json`: size and SHA-256 of every other file, written last.
//!
//! No random-number state is saved because none is needed: augmentation is keyed by
//! (seed, epoch, sample id), the epoch's order by (seed, epoch), PCGrad's task order by
//! (seed, step) with its step in the weighting state, and the initial weights (from
//! `job.seed`) are overwritten by the checkpoint's.
//!
//! Writing is all-or-nothing (see `disk`); the newest complete checkpoint is found by listing
//! `step-<N>/` directories, never through a pointer file. Opening checks every file against
//! the manifest; a corrupt or incomplete checkpoint is logged by name and the previous one is
//! used.
mod disk;
mod encode;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtl_job::{CheckpointSection, JobConfig};
use serde::{Deserialize, Serialize};

pub(crate) use disk::FileEntry;

use super::epochs::Position;
use super::{Trainer, TrainerState};
use crate::data::{DatasetInfo, OrderedSplit};
use crate::model::MultiTaskModel;
use crate::WorkerError;

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const WEIGHTING: &str = "weighting.safetensors";
const STATE: &str = "state.json";
const JOB: &str = "job.toml";
const DATASET: &str = "dataset.json";
/// Every file a checkpoint must list in its manifest.
const FILES: [&str; 6] = [MODEL, OPTIMIZER, WEIGHTING, STATE, JOB, DATASET];

/// `state.json`: where training stands and what it trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Optimizer steps taken; the learning-rate schedule is a function of it.
    pub step: u64,
    /// The epoch training continues in (0-based).
    pub epoch: u64,
    /// Samples of that epoch's permutation already trained, over all ranks.
    pub epoch_samples_consumed: u64,
    /// The generation of workers that wrote it (0 in standalone mode).
    pub generation: u64,
    /// Ranks that trained together.
    pub world_size: u32,
    /// [`config_hash`] of the job.
    pub config_hash: String,
    /// Samples in the training split; positions index its canonical order.
    pub train_samples: u64,
    /// [`OrderedSplit::fingerprint`] of the training split.
    pub train_fingerprint: String,
    /// The evaluation at this step, when one ran (`null` for an undefined value).
    pub metrics: BTreeMap<String, Option<f64>>,
}

impl Meta {
    /// Where training continues.
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, consumed: self.epoch_samples_consumed }
    }
}

/// What a checkpoint records besides the trainer's tensors.
#[derive(Clone, Copy)]
pub(crate) struct Record<'a> {
    /// The job (its token is not written).
    pub cfg: &'a JobConfig,
    /// The label spaces.
    pub info: &'a DatasetInfo,
    /// The training split (its size and fingerprint are recorded).
    pub train: &'a OrderedSplit,
    /// Where training continues.
    pub next: Position,
    /// The generation of workers (0 in standalone mode).
    pub generation: u64,
    /// The evaluation at this step, if one ran.
    pub metrics: Option<&'a BTreeMap<String, f64>>,
}

/// A checkpoint on disk: what committing it to the coordinator needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// Its directory.
    pub path: PathBuf,
    /// Its `state.json`.
    pub meta: Meta,
    /// Every file but the manifest, with size and SHA-256.
    pub files: BTreeMap<String, FileEntry>,
}

/// Writes `trainer`'s state as `step-<N>/` in `dir` (N = the steps it has taken).
pub(crate) fn write_step(dir: &Path, trainer: &Trainer, record: &Record<'_>) -> Result<Written, WorkerError> {
    write_at(&dir.join(disk::step_name(trainer.steps_done())), trainer, record)
}

/// Writes `trainer`'s state as the checkpoint directory `path`, replacing one there.
pub(crate) fn write_at(path: &Path, trainer: &Trainer, record: &Record<'_>) -> Result<Written, WorkerError> {
    let state = trainer.state_dict()?;
    let meta = Meta {
        step: state.step,
        epoch: record.next.epoch,
        epoch_samples_consumed: record.next.consumed,
        generation: record.generation,
        world_size: trainer.world_size() as u32,
        config_hash: record.cfg.hash(),
        train_samples: record.train.ids.len() as u64,
        train_fingerprint: record.train.fingerprint(),
        metrics: record
            .metrics
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.is_finite().then_some(*v))).collect())
            .unwrap_or_default(),
    };
    let files = [
        (MODEL, encode::tensors_to_bytes(&state.model, MODEL)?),
        (OPTIMIZER, encode::tensors_to_bytes(&state.optimizer, OPTIMIZER)?),
        (WEIGHTING, encode::tensors_to_bytes(&state.weighting, WEIGHTING)?),
        (STATE, serde_json::to_vec_pretty(&meta).expect("state serialises")),
        (JOB, record.cfg.to_toml().into_bytes()), // without the token (`JobToken` writes none)
        (DATASET, encode::info_json(record.info).into_bytes()),
    ];
    let files = disk::write_dir(path, &files)?;
    Ok(Written { path: path.to_owned(), meta, files })
}

/// A checkpoint read back, every file checked against its manifest.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub path: PathBuf,
    /// The job that trained it.
    pub cfg: JobConfig,
    /// Its label spaces.
    pub info: DatasetInfo,
    /// Its `state.json`.
    pub meta: Meta,
    files: BTreeMap<String, Vec<u8>>,
}

/// A checkpoint that [`open`] passed over, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejected {
    /// Its directory.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// Opens `path`: a checkpoint directory itself, or a directory of `step-<N>/` checkpoints,
/// of which the newest complete one is taken (each one passed over is logged with the
/// reason). A checkpoint named directly must be complete.
pub fn open(path: &Path) -> Result<Checkpoint, WorkerError> {
    if is_checkpoint(path) {
        return read(path)
            .map_err(|reason| WorkerError::Checkpoint { path: path.to_owned(), message: reason });
    }
    Ok(newest(path)?.0)
}

/// Opens the committed checkpoint `named`; when it is corrupt or incomplete, logs why and
/// takes the newest complete one in `dir` older than `step` (each one passed over logged too).
pub(crate) fn open_committed(dir: &Path, named: &Path, step: u64) -> Result<Checkpoint, WorkerError> {
    let err = match read(named) {
        Ok(checkpoint) => return Ok(checkpoint),
        Err(reason) => WorkerError::Checkpoint { path: named.to_owned(), message: reason },
    };
    tracing::warn!(checkpoint = %named.display(), %err, "the committed checkpoint is unusable; using the previous complete one");
    for (_, path) in disk::list_steps(dir)?.into_iter().rev().filter(|(s, _)| *s < step) {
        match read(&path) {
            Ok(checkpoint) => return Ok(checkpoint),
            Err(reason) => {
                tracing::warn!(checkpoint = %path.display(), %reason, "skipping a corrupt or incomplete checkpoint")
            }
        }
    }
    Err(err)
}

/// Whether `path` is meant as one checkpoint rather than a directory of them.
fn is_checkpoint(path: &Path) -> bool {
    path.join(disk::MANIFEST).exists()
        || path.join(MODEL).exists()
        || path.file_name().and_then(|n| n.to_str()).and_then(disk::parse_step_name).is_some()
}

/// The newest complete checkpoint in `dir`, and the newer ones passed over.
pub(crate) fn newest(dir: &Path) -> Result<(Checkpoint, Vec<Rejected>), WorkerError> {
    let mut rejected = Vec::new();
    for (_, path) in disk::list_steps(dir)?.into_iter().rev() {
        match read(&path) {
            Ok(checkpoint) => return Ok((checkpoint, rejected)),
            Err(reason) => {
                tracing::warn!(checkpoint = %path.display(), %reason, "skipping a corrupt or incomplete checkpoint");
                rejected.push(Rejected { path, reason });
            }
        }
    }
    let message = if rejected.is_empty() {
        "no checkpoint here (neither a step-<N>/ directory nor a manifest.json)".to_string()
    } else {
        let why: Vec<String> =
            rejected.iter().map(|r| format!("{}: {}", r.path.display(), r.reason)).collect();
        format!("no complete checkpoint: {}", why.join("; "))
    };
    Err(WorkerError::Checkpoint { path: dir.to_owned(), message })
}

fn read(path: &Path) -> Result<Checkpoint, String> {
    let files = disk::read_verified(path)?;
    if let Some(missing) = FILES.iter().find(|f| !files.contains_key(**f)) {
        return Err(format!("{missing} is not in the manifest"));
    }
    let text = |name: &str| std::str::from_utf8(&files[name]).map_err(|e| format!("{name}: {e}"));
    let cfg = JobConfig::from_toml(text(JOB)?).map_err(|e| format!("{JOB}: {e}"))?;
    let info = encode::info_from_json(text(DATASET)?).map_err(|e| format!("{DATASET}: {e}"))?;
    let meta: Meta = serde_json::from_str(text(STATE)?).map_err(|e| format!("{STATE}: {e}"))?;
    Ok(Checkpoint { path: path.to_owned(), cfg, info, meta, files })
}

impl Checkpoint {
    fn tensors(&self, name: &str) -> Result<Vec<(String, tch::Tensor)>, WorkerError> {
        encode::tensors_from_bytes(&self.files[name], &self.path.join(name))
    }

    /// Loads the weights into `model` (built from [`Self::cfg`] and [`Self::info`]).
    pub fn load_model(&self, model: &mut MultiTaskModel) -> Result<(), WorkerError> {
        let mut vars: Vec<(String, tch::Tensor)> = model.var_store().variables().into_iter().collect();
        let mut live: Vec<(String, &mut tch::Tensor)> =
            vars.iter_mut().map(|(n, t)| (n.clone(), t)).collect();
        crate::optim::load_entries("model", &mut live, &self.tensors(MODEL)?)
    }

    /// The trainer's state, for [`Trainer::load_state_dict`].
    pub fn trainer_state(&self) -> Result<TrainerState, WorkerError> {
        Ok(TrainerState {
            step: self.meta.step,
            model: self.tensors(MODEL)?,
            optimizer: self.tensors(OPTIMIZER)?,
            weighting: self.tensors(WEIGHTING)?,
        })
    }

    /// Checks that a run of `cfg` on `train` can continue from this checkpoint: the same job
    /// (up to where it runs and where checkpoints go) and the same training split.
    pub fn check_resumable(&self, cfg: &JobConfig, train: &OrderedSplit) -> Result<(), WorkerError> {
        let fail = |message: String| WorkerError::Checkpoint { path: self.path.clone(), message };
        if self.meta.config_hash != cfg.hash() {
            let changed = changed_keys(&self.cfg, cfg);
            return Err(fail(format!(
                "written by another job configuration (hash {}, this one {}); changed: {}",
                self.meta.config_hash,
                cfg.hash(),
                if changed.is_empty() { "unknown keys".into() } else { changed.join(", ") }
            )));
        }
        let (samples, fingerprint) = (train.ids.len() as u64, train.fingerprint());
        if (self.meta.train_samples, self.meta.train_fingerprint.as_str()) != (samples, fingerprint.as_str())
        {
            return Err(fail(format!(
                "trained on another training split ({} samples, fingerprint {}; now {samples}, {fingerprint})",
                self.meta.train_samples, self.meta.train_fingerprint
            )));
        }
        Ok(())
    }

    /// Continues `trainer` from this checkpoint, after [`Self::check_resumable`]; returns where
    /// training continues in the data.
    pub(crate) fn restore(
        &self,
        trainer: &mut Trainer,
        cfg: &JobConfig,
        train: &OrderedSplit,
    ) -> Result<Position, WorkerError> {
        self.check_resumable(cfg, train)?;
        trainer.load_state_dict(&self.trainer_state()?)?;
        let at = self.meta.position();
        tracing::info!(
            checkpoint = %self.path.display(),
            step = self.meta.step,
            epoch = at.epoch,
            epoch_samples_consumed = at.consumed,
            world_size = self.meta.world_size,
            "resumed"
        );
        Ok(at)
    }

    /// Writes the model's weights alone (the checked `model.safetensors`) to the file `out`;
    /// returns the number of tensors.
    pub fn export_model(&self, out: &Path) -> Result<usize, WorkerError> {
        let count = self.tensors(MODEL)?.len();
        disk::write_file_atomic(out, &self.files[MODEL])?;
        Ok(count)
    }
}

/// `section.key` paths whose values differ between the trained parts of two jobs.
fn changed_keys(a: &JobConfig, b: &JobConfig) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let [a, b] = [a, b].map(|c| {
        let mut out = BTreeMap::new();
        flatten("", &serde_json::to_value(c.trained_part()).expect("a JobConfig serialises"), &mut out);
        out
    });
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k} ({} -> {})",
                a.get(k).map_or("unset", String::as_str),
                b.get(k).map_or("unset", String::as_str)
            )
        })
        .collect()
}

/// The `step-<N>/` directories in `dir`, oldest first (complete or not; none if `dir` does not
/// exist).
pub(crate) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WorkerError> {
    disk::list_steps(dir)
}

/// Removes the complete checkpoints of `dir` beyond the newest `keep_last`, except the one
/// with the highest `keep_best` metric, and what interrupted writes left behind. Returns what
/// it removed. For a directory with one writer (standalone training); in distributed training
/// the coordinator decides what is kept.
pub(crate) fn prune(dir: &Path, section: &CheckpointSection) -> Result<Vec<PathBuf>, WorkerError> {
    let complete: Vec<(u64, PathBuf)> =
        disk::list_steps(dir)?.into_iter().filter(|(_, p)| p.join(disk::MANIFEST).exists()).collect();
    let keep_from = complete.len().saturating_sub(section.keep_last as usize);
    let best = best_step(&complete, &section.keep_best);
    let mut removed = disk::leftovers(dir);
    removed
        .extend(complete[..keep_from].iter().filter(|(step, _)| Some(*step) != best).map(|(_, p)| p.clone()));
    for path in &removed {
        std::fs::remove_dir_all(path).map_err(|source| WorkerError::Io { path: path.clone(), source })?;
    }
    Ok(removed)
}

/// The step of the checkpoint with the highest value of `metric` (`detection.AP50`: the
/// evaluation's `AP50`), the newest on a tie; `None` without a metric or a value.
fn best_step(complete: &[(u64, PathBuf)], metric: &str) -> Option<u64> {
    let key = metric.split_once('.')?.1;
    let mut best: Option<(f64, u64)> = None;
    for (step, path) in complete {
        let Ok(text) = std::fs::read(path.join(STATE)) else { continue };
        let Ok(meta) = serde_json::from_slice::<Meta>(&text) else { continue };
        if let Some(Some(value)) = meta.metrics.get(key) {
            if best.is_none_or(|(b, _)| *value >= b) {
                best = Some((*value, *step));
            }
        }
    }
    best.map(|(_, step)| step)
}

/// `worker eval --checkpoint`: the checkpoint at `path` (or the newest in it) evaluated on its
/// job's validation split; the merged metrics by key. `on_progress` counts images.
pub fn evaluate(
    path: &Path,
    device: tch::Device,
    on_progress: crate::OnProgress<'_>,
) -> Result<std::collections::BTreeMap<String, f64>, WorkerError> {
    let ckpt = open(path)?;
    let cfg = &ckpt.cfg;
    // Under the generator's lock: the initial values are overwritten, but drawing them must not
    // interleave with a seeded build elsewhere in the process.
    let mut model = crate::model::with_seed(0, || {
        crate::model::MultiTaskModel::new(&cfg.model, &cfg.tasks, &ckpt.info, device)
    })?;
    ckpt.load_model(&mut model)?;
    let val = crate::data::open_dataset(&cfg.data, crate::data::Split::Val, cfg.job.seed)?
        .map(crate::data::OrderedSplit::new)
        .ok_or_else(|| WorkerError::Data {
            key: "data.val".into(),
            message: "the checkpoint's job has no validation split".into(),
        })?;
    let (total, mut done) = (val.ids.len() as u64, 0);
    let loader = val.eval_loader(&val.ids, cfg)?.inspect(|batch| {
        if let Ok(batch) = batch {
            done += batch.ids.len() as u64;
            on_progress(done, total);
        }
    });
    let stats = super::eval::evaluate(&model, loader, &ckpt.info)?;
    Ok(stats.finish().to_map())
}
