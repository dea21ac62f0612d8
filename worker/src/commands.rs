//! What each `worker` subcommand does, on top of the library: the one place that prints.
//! Results go to stdout (a table, or one JSON object with `--json`); progress and logs go to
//! stderr.
use std::collections::BTreeMap;
use std::path::Path;

use mtl_job::JobConfig;
use mtl_worker::{BenchConfig, BenchStepOptions, Event, StandaloneOptions, SyntheticConfig, WorkerError};

use crate::progress::{self, Progress};

/// Prints metrics as a per-task table or as one JSON object.
pub(crate) fn print_metrics(map: &BTreeMap<String, f64>, json: bool) {
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
pub(crate) fn train_standalone(
    cfg: &JobConfig,
    device: tch::Device,
    opts: &StandaloneOptions,
    json: bool,
) -> Result<(), WorkerError> {
    // Evaluations before and during training go to stderr as tables; the final one is the
    // command's result, printed below. Steps move the progress bar, from the first step of
    // this run (a resumed run starts past 0).
    let mut bar: Option<Progress> = None;
    let mut on_event = |event: Event<'_>| match event {
        Event::Evaluated { step, metrics } => {
            if !json && step < cfg.train.steps {
                let when = if step == 0 { "untrained model".to_string() } else { format!("step {step}") };
                progress::suspend(|| eprint!("{when}:\n{}", mtl_metrics::render_table(metrics)));
            }
        }
        Event::Step { report, .. } => bar
            .get_or_insert_with(|| Progress::new("training", "steps", cfg.train.steps, report.step - 1))
            .set(report.step),
        Event::Checkpoint { .. } => {}
    };
    let summary = mtl_worker::train_standalone(cfg, device, opts, &mut on_event)?;
    drop(bar);
    if !json {
        match &summary.checkpoint {
            Some(path) if summary.steps < cfg.train.steps => {
                println!("stopped after {} steps; resume from {}", summary.steps, path.display());
            }
            _ => println!("trained {} steps; validation metrics:", summary.steps),
        }
    }
    print_metrics(&summary.last, json);
    Ok(())
}

/// `worker eval --checkpoint PATH`: the checkpoint's model on its job's validation split.
pub(crate) fn eval_checkpoint(path: &Path, device: tch::Device, json: bool) -> Result<(), WorkerError> {
    let mut bar: Option<Progress> = None;
    let mut on_progress = |done, total| {
        bar.get_or_insert_with(|| Progress::new("evaluating", "images", total, 0)).set(done);
    };
    let metrics = mtl_worker::evaluate_checkpoint(path, device, &mut on_progress)?;
    drop(bar);
    print_metrics(&metrics, json);
    Ok(())
}

/// `worker export --checkpoint PATH --out FILE`: the checkpoint's model weights alone.
pub(crate) fn export(path: &Path, out: &Path) -> Result<(), WorkerError> {
    let ckpt = mtl_worker::open_checkpoint(path)?;
    let tensors = ckpt.export_model(out)?;
    println!(
        "wrote the {tensors} model tensors of {} (step {}) to {}",
        ckpt.path.display(),
        ckpt.meta.step,
        out.display()
    );
    Ok(())
}

/// `worker eval --gt coco.json --detections results.json`: scores a COCO results file exactly
/// as pycocotools' COCOeval (bbox) does.
pub(crate) fn eval_files(gt: &Path, detections: &Path, json: bool) -> Result<(), WorkerError> {
    let stats = mtl_metrics::coco::load_detection_stats(gt, detections)
        .map_err(|e| WorkerError::Metrics { message: e.to_string() })?;
    let report = mtl_metrics::EvalStats { detection: Some(stats), ..Default::default() };
    print_metrics(&report.finish().to_map(), json);
    Ok(())
}

/// `worker collective-bench`: one rank; rank 0 prints one JSON line per message size.
pub(crate) fn collective_bench(cfg: &BenchConfig) -> Result<(), WorkerError> {
    let rank = cfg.rank;
    mtl_worker::collective_bench(cfg, |r| {
        if rank == 0 {
            println!(
                "{{\"world_size\":{},\"size_bytes\":{},\"seconds\":{:.6},\"algbw_gbs\":{:.3},\"busbw_gbs\":{:.3}}}",
                r.world_size, r.size_bytes, r.seconds, r.algbw_gbs, r.busbw_gbs
            );
        }
    })?;
    Ok(())
}

/// `worker predict`.
pub(crate) fn predict(
    checkpoint: &Path,
    input: &Path,
    image_root: Option<&Path>,
    out: &Path,
    device: tch::Device,
    batch_size: usize,
    overlay_score: f64,
) -> Result<(), WorkerError> {
    let mut bar: Option<Progress> = None;
    let mut on_progress = |done, total| {
        bar.get_or_insert_with(|| Progress::new("predicting", "images", total, 0)).set(done);
    };
    let s = mtl_worker::predict(
        checkpoint,
        input,
        image_root,
        out,
        device,
        batch_size,
        overlay_score,
        &mut on_progress,
    )?;
    drop(bar);
    println!(
        "predicted {} images ({} skipped), {} detections; written to {}",
        s.images,
        s.skipped,
        s.detections,
        out.display()
    );
    Ok(())
}

/// `worker gen-data shapes`.
pub(crate) fn gen_shapes(out: &Path, cfg: &SyntheticConfig) -> Result<(), WorkerError> {
    let mut bar = Progress::new("generating", "images", u64::from(cfg.n), 0);
    mtl_worker::generate_shapes(out, cfg, &mut |done, _| bar.set(done))?;
    drop(bar);
    tracing::info!(out = %out.display(), n = cfg.n, size = cfg.size, seed = cfg.seed, "dataset written");
    Ok(())
}

/// `worker bench-step`.
pub(crate) fn bench_step(
    cfg: &JobConfig,
    device: tch::Device,
    opts: &BenchStepOptions,
    json: bool,
) -> Result<(), WorkerError> {
    let r = mtl_worker::bench_step(cfg, device, opts)?;
    if json {
        println!("{}", serde_json::to_string(&r).expect("plain numbers and strings"));
    } else {
        println!(
            "{:.2} ms/step, {:.1} images/s ({} steps after {} warm-up, batch {} at {} px, {} {}{} on {})",
            r.ms_per_step,
            r.images_per_s,
            r.steps,
            r.warmup,
            r.batch_size,
            r.image_size,
            format!("{:?}", cfg.model.backbone).to_lowercase(),
            r.precision,
            if r.channels_last { " channels_last" } else { "" },
            r.device
        );
    }
    Ok(())
}
