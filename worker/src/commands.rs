//! What the `worker` subcommands other than `run` do: standalone training, evaluation of a
//! checkpoint or of a COCO results file. Results go to stdout (a table, or one JSON object
//! with `--json`); logs go to stderr.
use std::collections::BTreeMap;
use std::path::Path;

use mtl_job::JobConfig;

use crate::data::{open_dataset, Split};
use crate::model::MultiTaskModel;
use crate::train::standalone::{self, OrderedSplit};
use crate::train::{checkpoint, eval};
use crate::WorkerError;

/// Prints metrics as a per-task table or as one JSON object.
pub fn print_metrics(map: &BTreeMap<String, f64>, json: bool) {
    if json {
        // NaN is not JSON: undefined metrics are null.
        let obj: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(k, v)| {
                (k.clone(), serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into))
            })
            .collect();
        println!("{}", serde_json::Value::Object(obj));
    } else {
        print!("{}", mtl_metrics::render_table(map));
    }
}

/// `worker train --standalone`.
pub fn train_standalone(
    cfg: &JobConfig,
    device: tch::Device,
    out: Option<&Path>,
    json: bool,
) -> Result<(), WorkerError> {
    let summary = standalone::run(cfg, device, out.map(Path::to_owned), json)?;
    if !json {
        println!("trained {} steps; validation metrics:", summary.steps);
    }
    print_metrics(&summary.last, json);
    Ok(())
}

/// `worker eval --checkpoint DIR`: the checkpoint's model on its job's validation split.
pub fn eval_checkpoint(dir: &Path, device: tch::Device, json: bool) -> Result<(), WorkerError> {
    let loaded = checkpoint::open(dir)?;
    let cfg = &loaded.cfg;
    let mut model = MultiTaskModel::new(&cfg.model, &cfg.tasks, &loaded.info, device)?;
    checkpoint::load_into(&mut model, &loaded.weights)?;
    let val = open_dataset(&cfg.data, Split::Val, cfg.job.seed)?.map(OrderedSplit::new).ok_or_else(|| {
        WorkerError::Model {
            key: "data.val".into(),
            message: "the checkpoint's job has no validation split".into(),
        }
    })?;
    let stats = eval::evaluate(&model, val.eval_loader(&val.ids, cfg)?, &loaded.info)?;
    print_metrics(&stats.finish().to_map(), json);
    Ok(())
}

/// `worker eval --gt coco.json --detections results.json`: scores a COCO results file exactly
/// as pycocotools' COCOeval (bbox) does.
pub fn eval_files(gt: &Path, detections: &Path, json: bool) -> Result<(), WorkerError> {
    let stats = mtl_metrics::coco::load_detection_stats(gt, detections)
        .map_err(|e| WorkerError::Metrics { message: e.to_string() })?;
    let report = mtl_metrics::EvalStats { detection: Some(stats), ..Default::default() };
    print_metrics(&report.finish().to_map(), json);
    Ok(())
}
