//! The loader: a pool of threads decoding and augmenting whole batches ahead of the training
//! step, at most `prefetch_batches` ahead, handed out in shard order.
//!
//! Batch `i` is the `i`-th chunk of `batch_size` ids of the shard (the last may be shorter).
//! Each sample's augmentation is keyed by (seed, epoch, id), so the batches are identical for
//! any number of threads. A sample whose image (or mask) is missing or corrupt is skipped,
//! logged with its path and recorded in [`LoaderSummary`]; its batch is formed from the rest of
//! its chunk (B = 0 if nothing is left, so every rank still runs the same number of steps).
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use image::DynamicImage;
use mtl_job::DataSection;

use super::augment::{augment, AugmentConfig};
use super::batch::{Batch, OriginalSample, Prepared};
use super::rle::rasterise;
use super::sample::{Dataset, Decoded, DecodedCache, MaskSource, SampleRecord};
use crate::model::MultiTaskModel;
use crate::task::Task;
use crate::WorkerError;

/// How a [`Loader`] batches and transforms its shard.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Decode + augment threads (at least 1).
    pub threads: usize,
    /// Batches prepared ahead of the consumer (at least 1).
    pub prefetch_batches: usize,
    /// Augmentation (training) or letterbox (evaluation).
    pub augment: AugmentConfig,
    /// Job seed.
    pub seed: u64,
    /// Epoch, part of every sample's augmentation key.
    pub epoch: u64,
    /// The detection head's P3-P5 feature sizes for `augment.image_size` square inputs: each
    /// batch then carries its FCOS targets on this grid (`Batch::det_targets`), built in the
    /// loader threads. `None` when the detection task is off or nothing trains on the batches.
    pub det_grid: Option<[(i64, i64); 3]>,
    /// Collate into pinned (page-locked) host memory, for asynchronous copies to a GPU.
    pub pin_memory: bool,
    /// Keep decoded images in the dataset's [`DecodedCache`] across epochs
    /// (`data.cache_decoded`).
    pub cache_decoded: bool,
}

impl LoaderConfig {
    /// A training (`train = true`) or evaluation loader configured from `[data]`.
    pub fn from_section(data: &DataSection, batch_size: usize, train: bool, seed: u64, epoch: u64) -> Self {
        Self {
            batch_size,
            threads: data.loader_threads as usize,
            prefetch_batches: data.prefetch_batches as usize,
            augment: if train { AugmentConfig::train(data) } else { AugmentConfig::eval(data.image_size) },
            seed,
            epoch,
            det_grid: None,
            pin_memory: false,
            cache_decoded: data.cache_decoded,
        }
    }

    /// This configuration for the batches `model` trains on: FCOS targets built in the loader
    /// when it has a detection head (on its grid for the configured image size), batches in
    /// pinned memory when it is on a GPU.
    pub fn for_training(self, model: &MultiTaskModel) -> Self {
        let side = i64::from(self.augment.image_size);
        Self {
            det_grid: model.has_task(Task::Detection).then(|| model.feature_sizes(side, side)),
            pin_memory: model.var_store().device().is_cuda(),
            ..self
        }
    }
}

/// Samples the loader skipped, in shard order: (id, image path, reason).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoaderSummary {
    /// One entry per skipped sample.
    pub skipped: Vec<(u64, PathBuf, String)>,
}

type Outcome = (usize, Result<Batch, WorkerError>, Vec<(u64, PathBuf, String)>);

struct Shared {
    dataset: Arc<Dataset>,
    index: HashMap<u64, usize>,
    chunks: Vec<Vec<u64>>,
    cfg: LoaderConfig,
}

/// Yields the batches of one shard in order; see the module docs.
pub struct Loader {
    shared: Arc<Shared>,
    jobs_tx: Option<mpsc::Sender<usize>>,
    results_rx: mpsc::Receiver<Outcome>,
    ready: BTreeMap<usize, Outcome>,
    issued: usize,
    next: usize,
    workers: Vec<JoinHandle<()>>,
    summary: LoaderSummary,
}

impl Loader {
    /// Starts the threads and the first `prefetch_batches` batches. `ids` is the shard, in the
    /// order the coordinator chose; every id must be in `dataset`.
    pub fn new(dataset: Arc<Dataset>, ids: &[u64], cfg: LoaderConfig) -> Result<Self, WorkerError> {
        if cfg.batch_size == 0 || cfg.threads == 0 || cfg.prefetch_batches == 0 {
            return Err(WorkerError::Loader {
                message: format!(
                    "batch_size ({}), threads ({}) and prefetch_batches ({}) must be positive",
                    cfg.batch_size, cfg.threads, cfg.prefetch_batches
                ),
            });
        }
        let index = dataset.index_by_id();
        if let Some(id) = ids.iter().find(|id| !index.contains_key(id)) {
            return Err(WorkerError::Loader { message: format!("sample id {id} is not in the dataset") });
        }
        let chunks = ids.chunks(cfg.batch_size).map(<[u64]>::to_vec).collect();
        let threads = cfg.threads;
        let shared = Arc::new(Shared { dataset, index, chunks, cfg });
        let (jobs_tx, jobs_rx) = mpsc::channel::<usize>();
        let (results_tx, results_rx) = mpsc::channel();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let workers = (0..threads)
            .map(|t| {
                let (shared, jobs_rx, results_tx) = (shared.clone(), jobs_rx.clone(), results_tx.clone());
                std::thread::Builder::new()
                    .name(format!("loader-{t}"))
                    .spawn(move || work(&shared, &jobs_rx, &results_tx))
                    .map_err(|source| WorkerError::Io { path: PathBuf::from("<loader thread>"), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut loader = Self {
            shared,
            jobs_tx: Some(jobs_tx),
            results_rx,
            ready: BTreeMap::new(),
            issued: 0,
            next: 0,
            workers,
            summary: LoaderSummary::default(),
        };
        loader.fill();
        Ok(loader)
    }

    /// Number of batches this loader yields in all.
    pub fn len(&self) -> usize {
        self.shared.chunks.len()
    }

    /// True when the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.chunks.is_empty()
    }

    /// Samples skipped in the batches yielded so far.
    pub fn summary(&self) -> &LoaderSummary {
        &self.summary
    }

    fn fill(&mut self) {
        let limit = self.len().min(self.next + self.shared.cfg.prefetch_batches);
        while self.issued < limit {
            if let Some(tx) = &self.jobs_tx {
                // Workers only stop when this sender is dropped, so the send cannot fail.
                let _ = tx.send(self.issued);
            }
            self.issued += 1;
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, WorkerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.len() {
            return None;
        }
        self.fill();
        while !self.ready.contains_key(&self.next) {
            match self.results_rx.recv() {
                Ok(outcome) => {
                    self.ready.insert(outcome.0, outcome);
                }
                Err(_) => {
                    return Some(Err(WorkerError::Loader { message: "a loader thread panicked".into() }));
                }
            }
        }
        let (_, batch, skipped) = self.ready.remove(&self.next).expect("checked above");
        self.summary.skipped.extend(skipped);
        self.next += 1;
        self.fill();
        Some(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs_tx = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn work(shared: &Shared, jobs_rx: &Mutex<mpsc::Receiver<usize>>, results_tx: &mpsc::Sender<Outcome>) {
    loop {
        let job = jobs_rx.lock().map(|rx| rx.recv());
        let Ok(Ok(i)) = job else { return };
        let mut items = Vec::with_capacity(shared.chunks[i].len());
        let mut skipped = Vec::new();
        let cache = shared.cfg.cache_decoded.then_some(&shared.dataset.decoded);
        for &id in &shared.chunks[i] {
            let record = &shared.dataset.samples[shared.index[&id]];
            match prepare(record, &shared.cfg, cache) {
                Ok(p) => items.push(p),
                Err(reason) => {
                    tracing::warn!(id, path = %record.image.display(), %reason, "skipping sample");
                    skipped.push((id, record.image.clone(), reason));
                }
            }
        }
        let batch = Batch::collate(&items, &shared.dataset.info, &shared.cfg).map_err(WorkerError::from);
        if results_tx.send((i, batch, skipped)).is_err() {
            return;
        }
    }
}

/// Decodes (or takes from `cache`, keeping what it decodes there) and augments one sample; the
/// error is the reason it is skipped.
pub(crate) fn prepare(
    record: &SampleRecord,
    cfg: &LoaderConfig,
    cache: Option<&DecodedCache>,
) -> Result<Prepared, String> {
    let decoded = match cache.and_then(|c| c.get(record.id)) {
        Some(decoded) => decoded,
        None => {
            let decoded = Arc::new(decode(record)?);
            if let Some(cache) = cache {
                cache.insert(record.id, decoded.clone());
            }
            decoded
        }
    };
    let (w, h) = decoded.image.dimensions();
    let boxes = record.boxes.as_deref().unwrap_or(&[]);
    let sample = augment(
        &decoded.image,
        boxes,
        decoded.mask.as_deref(),
        &cfg.augment,
        [cfg.seed, cfg.epoch, record.id],
    );
    Ok(Prepared {
        id: record.id,
        sample,
        class: record.class.clone(),
        boxes_labelled: record.boxes.is_some(),
        original: OriginalSample { width: w, height: h, boxes: boxes.to_vec() },
    })
}

/// Reads a sample's image and mask from their files (or rasterises its instance annotations).
fn decode(record: &SampleRecord) -> Result<Decoded, String> {
    let image = image::open(&record.image).map_err(|e| format!("cannot read image: {e}"))?.into_rgb8();
    let (w, h) = image.dimensions();
    let mask = match &record.mask {
        None => None,
        Some(MaskSource::Png(path)) => {
            let m = match image::open(path) {
                Ok(DynamicImage::ImageLuma8(m)) => m,
                Ok(_) => return Err(format!("mask {} is not an 8-bit greyscale PNG", path.display())),
                Err(e) => return Err(format!("cannot read mask {}: {e}", path.display())),
            };
            if m.dimensions() != (w, h) {
                return Err(format!("mask {} is {:?}, the image {w}x{h}", path.display(), m.dimensions()));
            }
            Some(m.into_raw())
        }
        Some(MaskSource::Instances(inst)) => {
            if (inst.width, inst.height) != (w, h) {
                return Err(format!(
                    "annotated size {}x{} differs from the image's {w}x{h}",
                    inst.width, inst.height
                ));
            }
            Some(rasterise(inst).map_err(|e| format!("cannot rasterise the annotations: {e}"))?)
        }
    };
    Ok(Decoded { image, mask })
}

#[cfg(test)]
mod tests;
