//! The loader: threads decoding and augmenting the samples of a shard ahead of the training
//! step, at most `prefetch_batches` batches ahead, handed out as batches in shard order.
//!
//! Batch `i` is the `i`-th chunk of `batch_size` ids of the shard (the last may be shorter).
//! The threads take single samples, not whole batches, from one queue in shard order, so all
//! of them work on the earliest unfinished batch and one slow image does not hold up the rest
//! of its batch; the thread that prepares a batch's last sample collates it. The threads are a
//! [`LoaderPool`], which a training run keeps across its epochs ([`Loader::on`]).
//!
//! Each sample's augmentation is keyed by (seed, epoch, id), so the batches are identical for
//! any number of threads. A sample whose image (or mask) is missing or corrupt is skipped,
//! logged with its path and recorded in [`LoaderSummary`]; its batch is formed from the rest of
//! its chunk (B = 0 if nothing is left, so every rank still runs the same number of steps).
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
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
    /// Decode + augment threads of the loader's own pool ([`Loader::new`]; at least 1). A
    /// loader on a shared pool ([`Loader::on`]) uses that pool's threads.
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
    /// when it has a detection head (on its grid for the configured image size); when it is on
    /// a GPU, batches in pinned memory and colour jitter on the device.
    pub fn for_training(self, model: &MultiTaskModel) -> Self {
        let side = i64::from(self.augment.image_size);
        let gpu = model.var_store().device().is_cuda();
        Self {
            det_grid: model.has_task(Task::Detection).then(|| model.feature_sizes(side, side)),
            pin_memory: gpu,
            augment: AugmentConfig { jitter_on_device: gpu, ..self.augment },
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

/// A batch that failed (a panic while preparing it), or a batch and the samples skipped in it.
type Outcome = (usize, Result<Batch, WorkerError>, Vec<Skipped>);

/// A sample left out of its batch: (id, image path, reason).
type Skipped = (u64, PathBuf, String);

type Job = Box<dyn FnOnce() + Send>;

/// Threads that run loaders' sample jobs from one first-in, first-out queue. A training run
/// makes one and keeps it across epochs (no cold threads at each epoch's start); a job that
/// panics does not take its thread down.
pub struct LoaderPool {
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl LoaderPool {
    /// Starts `threads` (at least 1) threads, named `loader-<i>`.
    pub fn new(threads: usize) -> Result<Arc<Self>, WorkerError> {
        if threads == 0 {
            return Err(WorkerError::Loader { message: "a loader pool needs at least one thread".into() });
        }
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let threads = (0..threads)
            .map(|t| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("loader-{t}"))
                    .spawn(move || loop {
                        let job = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = job else { return };
                        // The job reports its own failure (see `SampleJob`); the thread lives on.
                        let _ = catch_unwind(AssertUnwindSafe(job));
                    })
                    .map_err(|source| WorkerError::Io { path: PathBuf::from("<loader thread>"), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Self { jobs: Some(jobs), threads }))
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    fn submit(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // The threads only stop when this sender is dropped, so the send cannot fail.
            let _ = jobs.send(job);
        }
    }
}

impl Drop for LoaderPool {
    /// Waits for the job each thread is running; queued jobs of dropped loaders return at once.
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One shard being loaded: what the sample jobs share with their [`Loader`].
struct Shard {
    dataset: Arc<Dataset>,
    index: HashMap<u64, usize>,
    chunks: Vec<Vec<u64>>,
    cfg: LoaderConfig,
    /// Per batch, the samples prepared so far.
    pending: Vec<Mutex<Pending>>,
    results: mpsc::Sender<Outcome>,
    /// Set when the loader is dropped: queued jobs then do nothing.
    cancelled: AtomicBool,
}

struct Pending {
    /// In chunk order: the prepared sample, or why it was skipped.
    samples: Vec<Option<Result<Prepared, Skipped>>>,
    left: usize,
    /// An error was sent for this batch; nothing more is.
    failed: bool,
}

impl Shard {
    /// Prepares sample `j` of batch `i`, and collates the batch if it was the last one left.
    fn prepare_sample(&self, i: usize, j: usize) {
        if self.cancelled.load(Ordering::Relaxed) {
            return;
        }
        // Reports the batch as failed if preparing or collating panics (this unwinds through it).
        let mut job = SampleJob { shard: self, batch: i, done: false };
        let id = self.chunks[i][j];
        let record = &self.dataset.samples[self.index[&id]];
        let cache = self.cfg.cache_decoded.then_some(&self.dataset.decoded);
        let sample = prepare(record, &self.cfg, cache).map_err(|reason| {
            tracing::warn!(id, path = %record.image.display(), %reason, "skipping sample");
            (id, record.image.clone(), reason)
        });
        let samples = {
            let mut pending = self.pending[i].lock().unwrap_or_else(PoisonError::into_inner);
            if pending.failed {
                job.done = true;
                return;
            }
            pending.samples[j] = Some(sample);
            pending.left -= 1;
            if pending.left > 0 {
                job.done = true;
                return;
            }
            std::mem::take(&mut pending.samples)
        };
        let (mut items, mut skipped) = (Vec::with_capacity(samples.len()), Vec::new());
        for sample in samples.into_iter().map(|s| s.expect("every sample of the batch is in")) {
            match sample {
                Ok(p) => items.push(p),
                Err(s) => skipped.push(s),
            }
        }
        let batch = Batch::collate(&items, &self.dataset.info, &self.cfg).map_err(WorkerError::from);
        job.done = true;
        // The loader may be gone (dropped mid-shard): nobody wants the batch then.
        let _ = self.results.send((i, batch, skipped));
    }
}

/// A sample job under way; if it is dropped before `done` (a panic), its batch fails.
struct SampleJob<'a> {
    shard: &'a Shard,
    batch: usize,
    done: bool,
}

impl Drop for SampleJob<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut pending = self.shard.pending[self.batch].lock().unwrap_or_else(PoisonError::into_inner);
        if !std::mem::replace(&mut pending.failed, true) {
            let error = WorkerError::Loader { message: "a loader thread panicked".into() };
            let _ = self.shard.results.send((self.batch, Err(error), Vec::new()));
        }
    }
}

/// Yields the batches of one shard in order; see the module docs.
pub struct Loader {
    pool: Arc<LoaderPool>,
    shard: Arc<Shard>,
    results: mpsc::Receiver<Outcome>,
    ready: BTreeMap<usize, Outcome>,
    issued: usize,
    next: usize,
    summary: LoaderSummary,
}

impl Loader {
    /// A loader with its own pool of `cfg.threads` threads, which end with it; see [`Loader::on`].
    pub fn new(dataset: Arc<Dataset>, ids: &[u64], cfg: LoaderConfig) -> Result<Self, WorkerError> {
        Self::on(&LoaderPool::new(cfg.threads)?, dataset, ids, cfg)
    }

    /// Starts loading the shard `ids` (in the order the coordinator chose; every id must be in
    /// `dataset`) on `pool`'s threads: the first `prefetch_batches` batches are queued at once.
    pub fn on(
        pool: &Arc<LoaderPool>,
        dataset: Arc<Dataset>,
        ids: &[u64],
        cfg: LoaderConfig,
    ) -> Result<Self, WorkerError> {
        Self::check(&cfg)?;
        let index = dataset.index_by_id();
        if let Some(id) = ids.iter().find(|id| !index.contains_key(id)) {
            return Err(WorkerError::Loader { message: format!("sample id {id} is not in the dataset") });
        }
        let chunks: Vec<Vec<u64>> = ids.chunks(cfg.batch_size).map(<[u64]>::to_vec).collect();
        let pending = chunks
            .iter()
            .map(|c| {
                Mutex::new(Pending {
                    samples: c.iter().map(|_| None).collect(),
                    left: c.len(),
                    failed: false,
                })
            })
            .collect();
        let (results_tx, results) = mpsc::channel();
        let shard = Shard {
            dataset,
            index,
            chunks,
            cfg,
            pending,
            results: results_tx,
            cancelled: AtomicBool::new(false),
        };
        let mut loader = Self {
            pool: pool.clone(),
            shard: Arc::new(shard),
            results,
            ready: BTreeMap::new(),
            issued: 0,
            next: 0,
            summary: LoaderSummary::default(),
        };
        loader.fill();
        Ok(loader)
    }

    fn check(cfg: &LoaderConfig) -> Result<(), WorkerError> {
        if cfg.batch_size == 0 || cfg.threads == 0 || cfg.prefetch_batches == 0 {
            return Err(WorkerError::Loader {
                message: format!(
                    "batch_size ({}), threads ({}) and prefetch_batches ({}) must be positive",
                    cfg.batch_size, cfg.threads, cfg.prefetch_batches
                ),
            });
        }
        Ok(())
    }

    /// Number of batches this loader yields in all.
    pub fn len(&self) -> usize {
        self.shard.chunks.len()
    }

    /// True when the shard is empty.
    pub fn is_empty(&self) -> bool {
        self.shard.chunks.is_empty()
    }

    /// Samples skipped in the batches yielded so far.
    pub fn summary(&self) -> &LoaderSummary {
        &self.summary
    }

    /// Queues the samples of the batches up to `prefetch_batches` ahead of the next one.
    fn fill(&mut self) {
        let limit = self.len().min(self.next + self.shard.cfg.prefetch_batches);
        while self.issued < limit {
            let i = self.issued;
            for j in 0..self.shard.chunks[i].len() {
                let shard = self.shard.clone();
                self.pool.submit(Box::new(move || shard.prepare_sample(i, j)));
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
            // The shard holds a sender, so this only fails if that is gone, which it is not
            // while `self` lives; every issued batch sends exactly one outcome.
            let outcome = self.results.recv().expect("the shard keeps the channel open");
            self.ready.insert(outcome.0, outcome);
        }
        let (_, batch, skipped) = self.ready.remove(&self.next).expect("checked above");
        self.summary.skipped.extend(skipped);
        self.next += 1;
        self.fill();
        Some(batch)
    }
}

impl Drop for Loader {
    /// Queued samples of this shard are dropped unprepared; with its own pool, this waits for
    /// the samples its threads are preparing.
    fn drop(&mut self) {
        self.shard.cancelled.store(true, Ordering::Relaxed);
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
