//! Evaluation: the model's predictions on a loader, accumulated as mergeable statistics
//! (the metrics crate). The coordinator merges the statistics of all ranks, so distributed
//! evaluation gives exactly the numbers of one process on the same validation set.
//! Boxes and masks are compared at the network's input resolution (after the evaluation
//! letterbox), where the loader puts both ground truth and predictions.
use mtl_metrics::{
    ClassificationStats, Detection as MDetection, DetectionStats, EvalStats, GroundTruth, MultiLabelStats,
    SegmentationStats,
};
use tch::{Device, Kind};

use crate::data::{Batch, ClassTarget, DatasetInfo};
use crate::model::MultiTaskModel;
use crate::model::{predict, Prediction};
use crate::task::Task;
use crate::tasks::classification::ClassPrediction;
use crate::WorkerError;

/// Empty statistics for the tasks the model has.
pub fn empty_stats(model: &MultiTaskModel, info: &DatasetInfo) -> Result<EvalStats, WorkerError> {
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
pub fn evaluate(
    model: &MultiTaskModel,
    loader: impl Iterator<Item = Result<Batch, WorkerError>>,
    info: &DatasetInfo,
) -> Result<EvalStats, WorkerError> {
    let device = model.var_store().device();
    let mut stats = empty_stats(model, info)?;
    for batch in loader {
        let batch = batch?;
        let preds = predict(model, &batch.images.f_to_device(device)?)?;
        accumulate(&mut stats, &batch, &preds, info)?;
    }
    Ok(stats)
}

/// Adds one batch's predictions to `stats`.
pub fn accumulate(
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
    let masks: Vec<i64> = Vec::<i64>::try_from(&batch.mask_target.to_device(Device::Cpu).reshape([-1]))?;
    let targets: Option<Vec<f32>> = match &batch.class_target {
        ClassTarget::Single(t) => {
            Some(Vec::<i64>::try_from(&t.to_device(Device::Cpu))?.into_iter().map(|v| v as f32).collect())
        }
        ClassTarget::Multi(t) => {
            Some(Vec::<f32>::try_from(&t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))?)
        }
    };
    let num_classes = info.class_names.len();
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
            let gts = batch.boxes[i]
                .iter()
                .map(|b| {
                    let (w, h) = (f64::from(b.x2 - b.x1), f64::from(b.y2 - b.y1));
                    GroundTruth {
                        bbox: [f64::from(b.x1), f64::from(b.y1), w, h],
                        category_id: cat(b.category),
                        area: w * h,
                        iscrowd: b.iscrowd,
                    }
                })
                .collect();
            let dets = pred
                .detections
                .iter()
                .map(|d| MDetection {
                    bbox: [f64::from(d.x1), f64::from(d.y1), f64::from(d.x2 - d.x1), f64::from(d.y2 - d.y1)],
                    score: f64::from(d.score),
                    category_id: cat(d.category),
                })
                .collect();
            s.add_image(id, gts, dets).map_err(metrics_err)?;
        }
        if let (true, Some(s), Some(mask)) = (mask_labelled[i], &mut stats.segmentation, &pred.mask) {
            let target: Vec<u8> = masks[i * pixels..(i + 1) * pixels].iter().map(|&v| v as u8).collect();
            s.add(mask, &target).map_err(metrics_err)?;
        }
    }
    Ok(())
}
