//! Opening a job: its splits in canonical order and a freshly initialised model.
use mtl_job::JobConfig;

use crate::data::{open_dataset, DatasetInfo, OrderedSplit, Split};
use crate::model::MultiTaskModel;
use crate::WorkerError;

/// The job's training split, its validation split (if configured) and a fresh model for them.
pub(crate) fn open_job(
    cfg: &JobConfig,
    device: tch::Device,
) -> Result<(OrderedSplit, Option<OrderedSplit>, MultiTaskModel), WorkerError> {
    let seed = cfg.job.seed;
    let train = OrderedSplit::new(open_dataset(&cfg.data, Split::Train, seed)?.ok_or_else(|| {
        WorkerError::Data { key: "data.train".into(), message: "no training split configured".into() }
    })?);
    let val = open_dataset(&cfg.data, Split::Val, seed)?.map(OrderedSplit::new);
    let model = job_model(cfg, &train.dataset.info, device)?;
    Ok((train, val, model))
}

/// The job's freshly initialised model for a dataset described by `info`: the initial weights
/// follow `job.seed` (ranks then take rank 0's anyway).
pub(crate) fn job_model(
    cfg: &JobConfig,
    info: &DatasetInfo,
    device: tch::Device,
) -> Result<MultiTaskModel, WorkerError> {
    crate::model::with_seed(cfg.job.seed as i64, || MultiTaskModel::new(&cfg.model, &cfg.tasks, info, device))
}
