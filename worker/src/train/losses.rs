//! Loss assembly for one step: detection targets, the batch's normalisers ([`Counts`]) and the
//! masked per-task losses.
//!
//! Every loss is a SUM over the labelled samples of the local batch divided by a normaliser
//! passed in ([`Counts`]). Summing the local [`Counts`] of all ranks before calling
//! [`task_losses`] makes the mean of the per-rank gradients times the world size equal to the
//! gradient one process would compute on the union of the batches (with the all-reduce summing;
//! with a mean all-reduce, scale the losses by the world size). A task with no labelled sample
//! still returns a loss connected to its head (value and gradients zero).
use tch::Kind;

use crate::data::batch::Batch;
use crate::model::{MultiTaskModel, Outputs};
use crate::task::{Task, TaskLosses};
use crate::tasks::fcos_targets::FcosTargets;
use crate::tasks::{classification, detection, segmentation};
use crate::{At, WorkerError};

/// Loss normalisers of a batch; summed across ranks before the losses use them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Counts {
    /// Samples with a class label.
    pub cls_labelled: f64,
    /// Positive FCOS locations in images with detection labels.
    pub det_positives: f64,
    /// Images with detection labels.
    pub det_labelled: f64,
    /// Pixels with a segmentation label other than 255 in images with masks.
    pub seg_valid_pixels: f64,
    /// Images in the batch (summed over ranks: the images the step trains on; the global batch
    /// less the images the loaders could not read).
    pub samples: f64,
}

impl Counts {
    /// The counts as an array, for an all-reduce.
    pub(crate) fn to_array(self) -> [f64; 5] {
        [self.cls_labelled, self.det_positives, self.det_labelled, self.seg_valid_pixels, self.samples]
    }

    /// Counts from an all-reduced array.
    pub(crate) fn from_array(a: [f64; 5]) -> Self {
        Counts {
            cls_labelled: a[0],
            det_positives: a[1],
            det_labelled: a[2],
            seg_valid_pixels: a[3],
            samples: a[4],
        }
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;
    fn add(self, o: Counts) -> Counts {
        let (a, b) = (self.to_array(), o.to_array());
        Counts::from_array(std::array::from_fn(|i| a[i] + b[i]))
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

/// The local (this rank's) normalisers of a batch.
pub(crate) fn local_counts(batch: &Batch, targets: &Targets) -> Result<Counts, WorkerError> {
    let labelled = || batch.class_labelled.f_to_kind(Kind::Int64)?.f_sum(Kind::Int64)?.f_int64_value(&[]);
    Ok(Counts {
        cls_labelled: labelled().at("classification label count")? as f64,
        det_positives: targets.det.as_ref().map_or(0.0, |t| t.num_positives as f64),
        det_labelled: batch.boxes_labelled.iter().filter(|&&l| l).count() as f64,
        seg_valid_pixels: segmentation::valid_pixels(&batch.mask_target, &batch.mask_labelled)?,
        samples: batch.ids.len() as f64,
    })
}

/// Masked per-task losses of `outputs` for `batch`, each divided by its normaliser (see the
/// module docs). The class target kind must match the head (softmax or multi-label); labels
/// outside a head's label space are an error naming the task's loss.
pub(crate) fn task_losses(
    outputs: &Outputs,
    batch: &Batch,
    targets: &Targets,
    normalisers: &Counts,
) -> Result<TaskLosses, WorkerError> {
    Ok(TaskLosses {
        cls: outputs
            .cls
            .as_ref()
            .map(|logits| {
                classification::loss(
                    logits,
                    &batch.class_target,
                    &batch.class_labelled,
                    normalisers.cls_labelled,
                )
            })
            .transpose()?,
        det: outputs
            .det
            .as_ref()
            .zip(targets.det.as_ref())
            .map(|(out, t)| detection::loss(out, t, normalisers.det_positives))
            .transpose()?,
        seg: outputs
            .seg
            .as_ref()
            .map(|logits| {
                segmentation::loss(
                    logits,
                    &batch.mask_target,
                    &batch.mask_labelled,
                    normalisers.seg_valid_pixels,
                )
            })
            .transpose()?,
    })
}
