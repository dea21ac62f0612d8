//! Evaluation: the model's predictions on a loader, accumulated as mergeable statistics
//! (the metrics crate). The coordinator merges the statistics of all ranks, so distributed
//! evaluation gives exactly the numbers of one process on the same validation set.
//!
//! Detections are scored as pycocotools scores `worker predict`'s `detections.json`: in the
//! original image's coordinates (mapped back through the inverse of the evaluation letterbox by
//! the function predict uses), against the boxes as annotated, with their COCO `area` for the
//! size ranges and their crowd flags. Masks are compared at the network's input resolution
//! (after the evaluation letterbox), where the loader puts both.
use mtl_metrics::{
    ClassificationStats, Detection as MDetection, DetectionStats, EvalStats, GroundTruth, MultiLabelStats,
    SegmentationStats,
};
use tch::{Device, Kind};

use crate::data::augment::Letterbox;
use crate::data::batch::network_images;
use crate::data::{Batch, ClassTarget, DatasetInfo};
use crate::model::MultiTaskModel;
use crate::model::{predict, Prediction};
use crate::predict::{coco_bbox, original_boxes};
use crate::task::Task;
use crate::tasks::classification::ClassPrediction;
use crate::WorkerError;

/// Empty statistics for the tasks the model has.
pub(crate) fn empty_stats(model: &MultiTaskModel, info: &DatasetInfo) -> Result<EvalStats, WorkerError> {
    let metrics_err = |e: mtl_metrics::MetricsError| WorkerError::Metrics { message: e.to_string() };
    let mut stats = EvalStats::default();
    if model.has_task(Task::Classification) {
        if info.multi_label {
            stats.multilabel = Some(MultiLabelStats::new(info.class_names.len()));
        } else {
            stats.classification =
                Some(ClassificationStats::new(info.class_names.len()).map_err(metrics_err)?);
        }
    }
    if model.has_task(Task::Detection) {
        stats.detection = Some(DetectionStats::new(info.det_categories.iter().map(|(id, _)| *id)));
    }
    if model.has_task(Task::Segmentation) {
        stats.segmentation = Some(SegmentationStats::new(info.seg_classes.len()).map_err(metrics_err)?);
    }
    Ok(stats)
}

/// Runs the model over `loader` and accumulates statistics of every labelled sample.
pub(crate) fn evaluate(
    model: &MultiTaskModel,
    loader: impl Iterator<Item = Result<Batch, WorkerError>>,
    info: &DatasetInfo,
) -> Result<EvalStats, WorkerError> {
    let device = model.var_store().device();
    let mut stats = empty_stats(model, info)?;
    for batch in loader {
        let batch = batch?;
        let preds = predict(model, &network_images(&batch.images, device)?)?;
        accumulate(&mut stats, &batch, &preds, info)?;
    }
    Ok(stats)
}

/// Adds one batch's predictions to `stats`.
pub(crate) fn accumulate(
    stats: &mut EvalStats,
    batch: &Batch,
    preds: &[Prediction],
    info: &DatasetInfo,
) -> Result<(), WorkerError> {
    let metrics_err = |e: mtl_metrics::MetricsError| WorkerError::Metrics { message: e.to_string() };
    let cls_labelled: Vec<bool> = Vec::<bool>::try_from(&batch.class_labelled.to_device(Device::Cpu))?;
    let mask_labelled: Vec<bool> = Vec::<bool>::try_from(&batch.mask_labelled.to_device(Device::Cpu))?;
    let size = batch.mask_target.size();
    let pixels = (size[1] * size[2]) as usize;
    // u8 as collated (i64 in a batch in the network's form): the values are class ids or 255.
    let masks: Vec<u8> =
        Vec::<u8>::try_from(&batch.mask_target.to_device(Device::Cpu).to_kind(Kind::Uint8).reshape([-1]))?;
    let targets: Option<Vec<f32>> = match &batch.class_target {
        ClassTarget::Single(t) => {
            Some(Vec::<i64>::try_from(&t.to_device(Device::Cpu))?.into_iter().map(|v| v as f32).collect())
        }
        ClassTarget::Multi(t) => {
            Some(Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))?)
        }
    };
    let num_classes = info.class_names.len();
    // The square network input's side, which the evaluation letterbox filled.
    let side = batch.images.size4()?.3 as u32;
    for (i, pred) in preds.iter().enumerate() {
        let id = batch.ids[i];
        if cls_labelled[i] {
            match (pred.class.clone(), &mut stats.classification, &mut stats.multilabel, &targets) {
                (Some(ClassPrediction::Single { index, .. }), Some(s), _, Some(t)) => {
                    s.add(index, t[i] as usize).map_err(metrics_err)?;
                }
                (Some(ClassPrediction::Multi(scores)), _, Some(s), Some(t)) => {
                    let labels = t[i * num_classes..(i + 1) * num_classes].iter().map(|&v| v > 0.5).collect();
                    s.add(id, scores.iter().map(|&v| f64::from(v)).collect(), labels).map_err(metrics_err)?;
                }
                _ => {}
            }
        }
        if let (true, Some(s)) = (batch.boxes_labelled[i], &mut stats.detection) {
            let cat = |c: u32| info.det_categories[c as usize].0;
            let original = &batch.originals[i];
            let gts = original
                .boxes
                .iter()
                .map(|b| GroundTruth {
                    bbox: [b.x, b.y, b.w, b.h],
                    category_id: cat(b.category),
                    area: b.area,
                    iscrowd: b.iscrowd,
                })
                .collect();
            let letterbox = Letterbox::new(side, original.width, original.height);
            let dets = original_boxes(pred, &letterbox)
                .iter()
                .map(|(b, score, category)| MDetection {
                    bbox: coco_bbox(b),
                    score: *score,
                    category_id: cat(*category),
                })
                .collect();
            s.add_image(id, gts, dets).map_err(metrics_err)?;
        }
        if let (true, Some(s), Some(mask)) = (mask_labelled[i], &mut stats.segmentation, &pred.mask) {
            s.add(mask, &masks[i * pixels..(i + 1) * pixels]).map_err(metrics_err)?;
        }
    }
    Ok(())
}
