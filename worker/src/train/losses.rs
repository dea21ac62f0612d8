//! Loss assembly for one step: detection targets, the batch's normalisers ([`Counts`]) and the
//! masked per-task losses.
//!
//! Every loss is a SUM over the labelled samples of the local batch divided by a normaliser
//! passed in ([`Normalisers`]). Summing the local counts of all ranks before calling
//! [`task_losses`] makes the mean of the per-rank gradients times the world size equal to the
//! gradient one process would compute on the union of the batches (with the all-reduce summing;
//! with a mean all-reduce, scale the losses by the world size). A task with no labelled sample
//! still returns a loss connected to its head (value and gradients zero).
#[cfg(test)]
use tch::Device;
use tch::{Kind, Tensor};

use crate::data::batch::{host_tensor_from, Batch, Part};
use crate::model::{MultiTaskModel, Outputs};
use crate::task::{Task, TaskLosses};
use crate::tasks::fcos_targets::FcosTargets;
use crate::tasks::{classification, detection, segmentation};
use crate::{At, WorkerError};

/// Loss normalisers of a batch, read on the host (tests and logs): the training step keeps
/// them on the device ([`local_counts`], [`Normalisers`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Counts {
    /// Samples with a class label.
    pub cls_labelled: f64,
    /// Pixels with a segmentation label other than 255 in images with masks.
    pub seg_valid_pixels: f64,
    /// Positive FCOS locations in images with detection labels.
    pub det_positives: f64,
    /// Images with detection labels.
    pub det_labelled: f64,
    /// Images in the batch (summed over ranks: the images the step trains on; the global batch
    /// less the images the loaders could not read).
    pub samples: f64,
}

/// Entries of the counts tensor: the [`Counts`] fields in declaration order, then the stop flag.
pub(crate) const COUNT_ENTRIES: usize = 6;

impl Counts {
    /// The counts as an array, in the order of the counts tensor.
    pub(crate) fn to_array(self) -> [f64; 5] {
        [self.cls_labelled, self.seg_valid_pixels, self.det_positives, self.det_labelled, self.samples]
    }

    /// Counts from an array in the order of the counts tensor.
    pub(crate) fn from_array(a: [f64; 5]) -> Self {
        Counts {
            cls_labelled: a[0],
            seg_valid_pixels: a[1],
            det_positives: a[2],
            det_labelled: a[3],
            samples: a[4],
        }
    }

    /// Reads a counts tensor ([`local_counts`], all-reduced or not) on the host, with the stop
    /// flag (the number of ranks that asked to stop).
    #[cfg(test)]
    pub(crate) fn read(counts: &Tensor) -> Result<(Counts, f64), WorkerError> {
        Counts::from_values(&crate::train::host_values(counts)?)
    }

    /// The counts and the stop flag from the values of a counts tensor.
    pub(crate) fn from_values(v: &[f64]) -> Result<(Counts, f64), WorkerError> {
        if v.len() != COUNT_ENTRIES {
            return Err(tch::TchError::Shape(format!("a counts tensor of {} entries", v.len())).into());
        }
        Ok((Counts::from_array([v[0], v[1], v[2], v[3], v[4]]), v[5]))
    }

    /// The counts as a device tensor (stop flag 0), as [`local_counts`] makes it.
    #[cfg(test)]
    pub(crate) fn to_tensor(self, device: Device) -> Tensor {
        let mut v = self.to_array().to_vec();
        v.push(0.0);
        Tensor::from_slice(&v).to_device(device)
    }

    /// The loss divisors of these counts, on `device`.
    #[cfg(test)]
    pub(crate) fn normalisers(self, device: Device) -> Normalisers {
        Normalisers::new(&self.to_tensor(device)).expect("a counts tensor")
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        let (a, b) = (self.to_array(), o.to_array());
        Counts::from_array(std::array::from_fn(|i| a[i] + b[i]))
    }
}

/// The divisors of the task losses, 0-dim f32 tensors on the device, each at least 1: taken
/// from a counts tensor (summed across ranks) without reading it.
#[derive(Debug)]
pub(crate) struct Normalisers {
    /// Labelled samples.
    pub cls: Tensor,
    /// Valid mask pixels.
    pub seg: Tensor,
    /// Positive FCOS locations.
    pub det: Tensor,
}

impl Normalisers {
    /// From a counts tensor ([`local_counts`], all-reduced).
    pub(crate) fn new(counts: &Tensor) -> Result<Self, WorkerError> {
        let clamped = counts.f_narrow(0, 0, 3)?.f_clamp_min(1.0)?.f_to_kind(Kind::Float)?;
        let mut parts = clamped.f_unbind(0)?.into_iter();
        let mut next = || parts.next().expect("three entries");
        Ok(Normalisers { cls: next(), seg: next(), det: next() })
    }
}

/// Targets computed from a batch before the forward pass (only detection needs any).
#[derive(Debug)]
pub(crate) struct Targets {
    /// FCOS assignment, when the detection head is on.
    pub det: Option<FcosTargets>,
}

/// Detection targets for `batch` on the model's P3-P5 grid: those the loader built with the
/// batch (`Batch::det_targets`), else assigned here (a batch made by hand, a loader given no
/// grid). Targets on another grid than the model's are an error.
pub(crate) fn build_targets(model: &MultiTaskModel, batch: &Batch) -> Result<Targets, WorkerError> {
    if !model.has_task(Task::Detection) {
        return Ok(Targets { det: None });
    }
    let (_, _, h, w) = batch.images.size4().at("batch images")?;
    let sizes = model.feature_sizes(h, w);
    let det = match &batch.det_targets {
        Some(t) if t.sizes == sizes => t.shallow_clone(),
        Some(t) => {
            let message = format!(
                "the batch's detection targets are on the grid {:?}, the model's for {h}x{w} images is {sizes:?}",
                t.sizes
            );
            return Err(WorkerError::from(tch::TchError::Shape(message)).at("detection targets"));
        }
        None => FcosTargets::new(&batch.boxes, &batch.boxes_labelled, &sizes).at("detection targets")?,
    };
    Ok(Targets { det: Some(det) })
}

/// The local (this rank's) counts of a batch on its device: `[6]` f64 in the order of
/// [`Counts::to_array`] plus `stop` (1 when this rank asks every rank to stop). What the labels
/// on the device give (labelled samples, valid pixels) is summed there; what the host knows
/// comes from [`host_known_counts`]. Nothing is read back: the step all-reduces this tensor and
/// divides by it.
#[cfg(test)]
pub(crate) fn local_counts(batch: &Batch, targets: &Targets, stop: bool) -> Result<Tensor, WorkerError> {
    device_counts(batch, &host_known_counts(batch, targets, stop)?)
}

/// The entries of [`local_counts`] that the host knows, uploaded to the batch's device without
/// waiting: `[4]` f64, positives of the host-built detection targets, labelled images, samples
/// and `stop`. Made before the step's device work, so that a captured CUDA graph of the step
/// reads them from a tensor instead of baking them in.
pub(crate) fn host_known_counts(batch: &Batch, targets: &Targets, stop: bool) -> Result<Tensor, WorkerError> {
    let on_host = [
        targets.det.as_ref().map_or(0.0, |t| t.num_positives as f64),
        batch.boxes_labelled.iter().filter(|&&l| l).count() as f64,
        batch.ids.len() as f64,
        if stop { 1.0 } else { 0.0 },
    ];
    let device = batch.images.device();
    // Pinned for a GPU: an upload from pageable memory may make the host wait for the stream.
    let on_host = host_tensor_from(&[Part::Copy(&on_host)], &[4], device.is_cuda()).at("batch counts")?;
    crate::train::upload(&on_host, device).at("batch counts")
}

/// [`local_counts`] from the host-known entries ([`host_known_counts`]), with no host value.
pub(crate) fn device_counts(batch: &Batch, host_known: &Tensor) -> Result<Tensor, WorkerError> {
    let counts = || -> Result<Tensor, tch::TchError> {
        let cls = batch.class_labelled.f_sum(Kind::Double)?;
        let seg = segmentation::valid_pixels(&batch.mask_target, &batch.mask_labelled)?;
        Tensor::f_cat(&[Tensor::f_stack(&[cls, seg], 0)?, host_known.shallow_clone()], 0)
    };
    counts().at("batch counts")
}

/// [`local_counts`] read on the host.
#[cfg(test)]
pub(crate) fn host_counts(batch: &Batch, targets: &Targets) -> Counts {
    Counts::read(&local_counts(batch, targets, false).expect("counts")).expect("read").0
}

/// Masked per-task losses of `outputs` for `batch`, each divided by its normaliser (see the
/// module docs). The class target kind must match the head (softmax or multi-label); labels
/// outside a head's label space are an error naming the task's loss.
pub(crate) fn task_losses(
    outputs: &Outputs,
    batch: &Batch,
    targets: &Targets,
    normalisers: &Normalisers,
) -> Result<TaskLosses, WorkerError> {
    Ok(TaskLosses {
        cls: outputs
            .cls
            .as_ref()
            .map(|logits| {
                classification::loss(logits, &batch.class_target, &batch.class_labelled, &normalisers.cls)
            })
            .transpose()?,
        det: outputs
            .det
            .as_ref()
            .zip(targets.det.as_ref())
            .map(|(out, t)| detection::loss(out, t, &normalisers.det))
            .transpose()?,
        seg: outputs
            .seg
            .as_ref()
            .map(|logits| {
                segmentation::loss(logits, &batch.mask_target, &batch.mask_labelled, &normalisers.seg)
            })
            .transpose()?,
    })
}
