//! `GET /metrics`: the job's status in the Prometheus (OpenMetrics) text format, built from
//! one status snapshot per scrape, so every value of a scrape belongs to the same moment.
//!
//! Gauges are what can go down or back: the state, the generation and its size, steps (a
//! regrouped generation continues from a survivor's step, a resumed one from a checkpoint),
//! losses, evaluation metrics, rates. Counters are what only grows over the job's life, which a
//! restarted coordinator reloads: training reports, evaluations, committed checkpoints.
use std::sync::atomic::AtomicU64;

use mtl_proto::v1::{JobStatus, MetricPoint, MetricsKind};
use prometheus_client::encoding::text::encode as encode_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every state `JobStatus.state` takes, so that the state gauges' set is fixed.
const STATES: [&str; 4] = ["rendezvous", "running", "finished", "failed"];

/// Renders one scrape. (Help texts have no final stop: the encoder adds one.)
pub(super) fn encode(status: &JobStatus) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("mtl");
    let mut gauge = |name: &str, help: &str, value: f64| {
        let g = FloatGauge::default();
        g.set(value);
        registry.register(name, help, g);
    };

    let job_state = Family::<Labels, FloatGauge>::default();
    for state in STATES {
        job_state
            .get_or_create(&vec![("state", state.to_string())])
            .set(f64::from(u8::from(status.state == state)));
    }
    gauge(
        "generation",
        "The generation the status shows (the running one, or the last to end)",
        status.generation as f64,
    );
    gauge("world_size", "Workers in that generation", f64::from(status.world_size));
    gauge("epoch", "The training epoch in progress", status.epoch as f64);
    let members = status.workers.iter().filter(|w| w.state != "waiting");
    gauge(
        "step",
        "The latest step a worker of the generation reported (heartbeat or report)",
        members.map(|w| w.last_step).max().unwrap_or(0) as f64,
    );
    gauge(
        "workers_alive",
        "Workers of the generation that are active (heard from within the heartbeat timeout)",
        status.workers.iter().filter(|w| w.state == "active").count() as f64,
    );
    gauge(
        "workers_waiting",
        "Workers registered and waiting for a generation to form or admit them",
        status.workers.iter().filter(|w| w.state == "waiting").count() as f64,
    );

    let worker_step = Family::<Labels, FloatGauge>::default();
    let worker_heartbeat = Family::<Labels, FloatGauge>::default();
    for w in status.workers.iter().filter(|w| w.state != "waiting") {
        let labels = vec![("worker", w.worker_id.clone()), ("rank", w.rank.to_string())];
        worker_step.get_or_create(&labels).set(w.last_step as f64);
        worker_heartbeat.get_or_create(&labels).set(w.heartbeat_age_ms as f64 / 1000.0);
    }

    let train = latest(status, MetricsKind::Train);
    let eval = latest(status, MetricsKind::Eval);
    let train_loss = Family::<Labels, FloatGauge>::default();
    let task_weight = Family::<Labels, FloatGauge>::default();
    if let Some(p) = train {
        gauge(
            "train_report_step",
            "The step of the latest training report (the loss gauges' step)",
            p.step as f64,
        );
        for (key, value) in &p.values {
            if let Some(task) = key.strip_prefix("loss/") {
                train_loss.get_or_create(&vec![("task", task.to_string())]).set(*value);
            } else if let Some(task) = key.strip_prefix("weight/") {
                task_weight.get_or_create(&vec![("task", task.to_string())]).set(*value);
            }
        }
        if let Some(lr) = p.values.get("lr") {
            gauge("learning_rate", "The learning rate at the latest training report", *lr);
        }
        if let Some(rate) = p.values.get("images_per_s") {
            gauge(
                "images_per_second",
                "Training images per second over all ranks, between the last two reports",
                *rate,
            );
        }
    }
    let eval_metric = Family::<Labels, FloatGauge>::default();
    if let Some(p) = eval {
        gauge("eval_step", "The step of the latest merged evaluation", p.step as f64);
        for (key, value) in &p.values {
            let task = mtl_metrics::metric_task(key).unwrap_or("other");
            eval_metric.get_or_create(&vec![("task", task.to_string()), ("metric", key.clone())]).set(*value);
        }
    }
    if let Some(c) = status.checkpoints.last() {
        gauge("checkpoint_step", "The step of the last committed checkpoint", c.step as f64);
    }

    registry.register("job_state", "1 for the job's state, 0 for the others", job_state);
    registry.register("worker_step", "The last step each worker of the generation reported", worker_step);
    registry.register(
        "worker_heartbeat_age_seconds",
        "Seconds since the coordinator last heard from each worker of the generation",
        worker_heartbeat,
    );
    registry.register(
        "train_loss",
        "Each task's loss at the latest training report (global batch)",
        train_loss,
    );
    registry.register("task_weight", "Each task's loss weight at the latest training report", task_weight);
    registry.register(
        "eval_metric",
        "The latest merged evaluation (all ranks), per task and metric; -1 is undefined (as pycocotools)",
        eval_metric,
    );
    let count = |kind: MetricsKind| status.history.iter().filter(|p| p.kind == kind as i32).count() as u64;
    let counter = |n: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        c
    };
    registry.register("train_reports", "Training reports recorded", counter(count(MetricsKind::Train)));
    registry.register("evaluations", "Merged evaluations recorded", counter(count(MetricsKind::Eval)));
    registry.register(
        "checkpoints_committed",
        "Checkpoints committed (pruned ones included)",
        counter(status.checkpoints.len() as u64),
    );

    let mut text = String::new();
    encode_text(&mut text, &registry)?;
    Ok(text)
}

/// The newest point of a kind.
fn latest(status: &JobStatus, kind: MetricsKind) -> Option<&MetricPoint> {
    status.history.iter().rev().find(|p| p.kind == kind as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtl_proto::v1::{CheckpointInfo, WorkerStatus};

    #[test]
    fn a_scrape_has_typed_families_labelled_by_task_and_metric() {
        let point = |kind: MetricsKind, step, values: &[(&str, f64)]| MetricPoint {
            kind: kind as i32,
            step,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..Default::default()
        };
        let status = JobStatus {
            state: "running".into(),
            generation: 2,
            world_size: 1,
            workers: vec![WorkerStatus {
                worker_id: "w0".into(),
                state: "active".into(),
                last_step: 9,
                heartbeat_age_ms: 250,
                ..Default::default()
            }],
            history: vec![
                point(MetricsKind::Train, 4, &[("loss/cls", 2.0)]),
                point(MetricsKind::Eval, 4, &[("accuracy", 0.5), ("AP50", 0.25), ("mIoU", 0.125)]),
                point(MetricsKind::Train, 8, &[("loss/cls", 1.5), ("images_per_s", 300.0)]),
            ],
            checkpoints: vec![CheckpointInfo { step: 8, ..Default::default() }],
            ..Default::default()
        };
        let text = encode(&status).unwrap();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        has("# TYPE mtl_job_state gauge");
        has("mtl_job_state{state=\"running\"} 1.0");
        has("mtl_job_state{state=\"failed\"} 0.0");
        has("mtl_generation 2.0");
        has("mtl_step 9.0");
        has("mtl_workers_alive 1.0");
        has("mtl_worker_heartbeat_age_seconds{worker=\"w0\",rank=\"0\"} 0.25");
        has("mtl_train_report_step 8.0");
        has("mtl_train_loss{task=\"cls\"} 1.5");
        has("mtl_images_per_second 300.0");
        has("mtl_eval_metric{task=\"det\",metric=\"AP50\"} 0.25");
        has("mtl_eval_metric{task=\"seg\",metric=\"mIoU\"} 0.125");
        has("mtl_checkpoint_step 8.0");
        has("# TYPE mtl_train_reports counter");
        has("mtl_train_reports_total 2");
        has("mtl_evaluations_total 1");
        has("mtl_checkpoints_committed_total 1");
        assert_eq!(text.lines().last(), Some("# EOF"));
    }
}
