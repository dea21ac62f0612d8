//! Data: datasets on disk, joint augmentation and the prefetching loader.
//!
//! Layout: `sample` (annotation records and label spaces), `jsonl`, `coco` and `synthetic` (the three formats,
//! each giving a [`Dataset`]), `rle` (COCO polygon/RLE rasterisation), `augment` (joint
//! geometry + colour jitter), `loader` (thread pool, ordered batches) and `batch` (the
//! [`Batch`] contract with the training step). Malformed annotation files fail when the
//! dataset is opened; unreadable images are skipped by the loader.
pub(crate) mod augment;
pub(crate) mod batch;
pub(crate) mod coco;
pub(crate) mod jsonl;
pub(crate) mod loader;
mod ordered;
#[cfg(test)]
pub(crate) mod proptests;
pub(crate) mod rle;
mod rng;
pub(crate) mod sample;
pub(crate) mod synthetic;
#[cfg(test)]
mod testutil;

use std::path::Path;
use std::time::Duration;

use mtl_job::{DataFormat, DataSection};

pub(crate) use batch::{Batch, ClassTarget};
pub(crate) use loader::{Loader, LoaderConfig, LoaderPool};
pub(crate) use ordered::OrderedSplit;
pub(crate) use sample::{Dataset, DatasetInfo};

use crate::WorkerError;

/// Which split of the dataset to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// `data.train`.
    Train,
    /// `data.val`.
    Val,
}

/// How long a process opening the synthetic dataset waits for another one generating it.
const SYNTHETIC_GENERATION_WAIT: Duration = Duration::from_secs(600);

/// Opens a split as `[data]` describes it, generating the synthetic dataset first if needed.
/// `Ok(None)` when the split is not configured (an empty `data.val`). `seed` is `job.seed`.
/// A split without samples (but a synthetic validation split, which is then `None`) and a
/// COCO `image_root` that is not a directory are errors.
pub(crate) fn open_dataset(
    data: &DataSection,
    split: Split,
    seed: u64,
) -> Result<Option<Dataset>, WorkerError> {
    let path = match (data.format, split) {
        (DataFormat::Synthetic, _) => {
            let cfg = synthetic::SyntheticConfig {
                n: data.synthetic_n,
                size: data.synthetic_size,
                seed,
                val_fraction: data.synthetic_val_fraction,
                preset: data.synthetic_preset,
            };
            synthetic::ensure(&data.train, &cfg, SYNTHETIC_GENERATION_WAIT)?;
            let name = if split == Split::Train { "train.jsonl" } else { "val.jsonl" };
            data.train.join(name)
        }
        (_, Split::Train) => data.train.clone(),
        (_, Split::Val) if data.val.as_os_str().is_empty() => return Ok(None),
        (_, Split::Val) => data.val.clone(),
    };
    let dataset = match data.format {
        DataFormat::Synthetic | DataFormat::Jsonl => jsonl::read_manifest(&path)?,
        DataFormat::Coco => {
            let root = if data.image_root.as_os_str().is_empty() {
                path.parent().unwrap_or(Path::new("")).to_owned()
            } else {
                data.image_root.clone()
            };
            // Every image would be skipped: say so now, not after an epoch of empty batches.
            if !data.image_root.as_os_str().is_empty() && !root.is_dir() {
                return Err(WorkerError::Data {
                    key: "data.image_root".into(),
                    message: format!("{} is not a directory", root.display()),
                });
            }
            coco::read_coco(&path, &root, data.class_rule)?
        }
    };
    if dataset.samples.is_empty() && data.format == DataFormat::Synthetic && split == Split::Val {
        // `synthetic_val_fraction` chose no validation images: there is no validation split.
        return Ok(None);
    }
    if dataset.samples.is_empty() {
        let key = if split == Split::Train { "data.train" } else { "data.val" };
        return Err(WorkerError::Data {
            key: key.into(),
            message: format!("{} has no samples", path.display()),
        });
    }
    tracing::info!(path = %path.display(), samples = dataset.samples.len(), "dataset opened");
    Ok(Some(dataset))
}

#[cfg(test)]
mod tests;
