//! `GET /api/status`: the job's status (what `coordinator status` renders) as JSON for the
//! dashboard. The metrics history grows for the whole run, so a poll asks only for the points
//! from `since` on; `history_len` says where the next poll starts.
use mtl_proto::v1::{JobStatus, MetricsKind};
use serde_json::{json, Value};

/// Parses the query's `since=N` (absent: 0).
pub(super) fn since(query: Option<&str>) -> Result<usize, String> {
    let Some(query) = query else { return Ok(0) };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("since=") {
            return value
                .parse()
                .map_err(|_| format!("`since` must be a history index (a whole number), got `{value}`\n"));
        }
    }
    Ok(0)
}

/// The status as the dashboard reads it; the history from point `since` on.
pub(super) fn view(status: &JobStatus, since: usize) -> Value {
    let workers: Vec<Value> = status
        .workers
        .iter()
        .map(|w| {
            json!({
                "worker_id": w.worker_id,
                // A worker waiting in the rendezvous has no rank yet.
                "rank": (w.state != "waiting").then_some(w.rank),
                "host": w.host,
                "device": w.device,
                "state": w.state,
                "phase": w.phase,
                "last_step": w.last_step,
                "heartbeat_age_ms": w.heartbeat_age_ms,
                "collective_seq": w.collective_seq,
            })
        })
        .collect();
    let checkpoints: Vec<Value> = status
        .checkpoints
        .iter()
        .map(|c| {
            json!({
                "step": c.step,
                "epoch": c.epoch,
                "epoch_position": c.epoch_position,
                "generation": c.generation,
                "path": c.path,
                "pruned": c.pruned,
            })
        })
        .collect();
    let events: Vec<Value> = status
        .events
        .iter()
        .map(|e| json!({"at_unix_ms": e.at_unix_ms, "generation": e.generation, "kind": e.kind, "detail": e.detail}))
        .collect();
    let history: Vec<Value> = status
        .history
        .iter()
        .skip(since)
        .map(|p| {
            json!({
                "kind": if p.kind == MetricsKind::Eval as i32 { "eval" } else { "train" },
                "step": p.step,
                "epoch": p.epoch,
                "generation": p.generation,
                "rank": p.rank,
                // Sorted keys; NaN (an undefined metric) becomes null.
                "values": p.values.iter().collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .collect();
    json!({
        "job_name": status.job_name,
        "state": status.state,
        "message": status.message,
        "generation": status.generation,
        "world_size": status.world_size,
        "epoch": status.epoch,
        "epoch_position": status.epoch_position,
        "config_hash": status.config_hash,
        "workers": workers,
        "checkpoints": checkpoints,
        "events": events,
        "history_len": status.history.len(),
        "since": since,
        "history": history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtl_proto::v1::{MetricPoint, WorkerStatus};

    #[test]
    fn since_reads_the_query_and_names_a_bad_value() {
        assert_eq!(since(None), Ok(0));
        assert_eq!(since(Some("since=12")), Ok(12));
        assert_eq!(since(Some("x=1&since=3")), Ok(3));
        assert!(since(Some("since=-1")).unwrap_err().contains("`-1`"));
    }

    #[test]
    fn the_view_sends_the_history_from_since_and_nan_as_null() {
        let point = |kind: MetricsKind, step, key: &str, v: f64| MetricPoint {
            kind: kind as i32,
            step,
            values: [(key.to_string(), v)].into_iter().collect(),
            ..Default::default()
        };
        let status = JobStatus {
            state: "running".into(),
            workers: vec![
                WorkerStatus { worker_id: "a".into(), rank: 1, state: "active".into(), ..Default::default() },
                WorkerStatus { worker_id: "b".into(), state: "waiting".into(), ..Default::default() },
            ],
            history: vec![
                point(MetricsKind::Eval, 0, "mIoU", f64::NAN),
                point(MetricsKind::Train, 4, "loss/cls", 1.5),
                point(MetricsKind::Train, 8, "loss/cls", 1.25),
            ],
            ..Default::default()
        };
        let all = view(&status, 0);
        assert_eq!(all["history_len"], 3);
        assert_eq!(all["history"][0]["kind"], "eval");
        assert_eq!(all["history"][0]["values"]["mIoU"], Value::Null);
        assert_eq!(all["workers"][0]["rank"], 1);
        assert_eq!(all["workers"][1]["rank"], Value::Null, "no rank while waiting");
        let tail = view(&status, 2);
        assert_eq!(tail["history"].as_array().unwrap().len(), 1);
        assert_eq!(tail["history"][0]["step"], 8);
        assert_eq!(tail["history"][0]["values"]["loss/cls"], 1.25);
        assert_eq!(view(&status, 9)["history"].as_array().unwrap().len(), 0, "past the end: nothing new");
    }
}
