//! A split in canonical order: training and evaluation address samples by their position in
//! the sorted ids, which is what the coordinator's sharding hands out.
use std::sync::Arc;

use mtl_job::JobConfig;

use super::{Dataset, Loader, LoaderConfig};
use crate::WorkerError;

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
