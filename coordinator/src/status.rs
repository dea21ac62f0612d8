//! `coordinator status`: fetch a job's status over gRPC and render it as a table.
use std::collections::BTreeMap;
use std::fmt::Write;

use mtl_proto::client::ClientTls;
use mtl_proto::v1::{JobStatus, MetricsKind, StatusRequest};

use crate::CoordinatorError;

/// Fetches the status of the job served at `addr` (over TLS with `tls` when it is `https://`).
pub async fn fetch(addr: &str, token: &str, tls: &ClientTls) -> Result<JobStatus, CoordinatorError> {
    let unreachable = |message: String| CoordinatorError::Unreachable { addr: addr.to_string(), message };
    let mut client = mtl_proto::client::connect(addr, tls)
        .await
        .map_err(|e| unreachable(format!("cannot connect: {e}")))?;
    let status = client
        .get_status(StatusRequest { job_token: token.to_string() })
        .await
        .map_err(|s| unreachable(mtl_proto::client::describe_status(&s)))?;
    Ok(status.into_inner())
}

/// A human-readable summary: job state, workers, generation changes, checkpoints, epoch
/// accounting and the latest metrics of each kind.
pub fn render(status: &JobStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}: {} (generation {}, {} workers, config hash {})",
        status.job_name, status.state, status.generation, status.world_size, status.config_hash
    );
    if status.state == "running" {
        let _ = writeln!(out, "  epoch {}, {} samples of it consumed", status.epoch, status.epoch_position);
    }
    if let Some(r) = &status.resume {
        let _ = writeln!(
            out,
            "  generation {} resumed from checkpoint step {} ({}, epoch {} at sample {})",
            status.generation, r.step, r.path, r.epoch, r.epoch_position
        );
    }
    if !status.message.is_empty() {
        let _ = writeln!(out, "  {}", status.message);
    }
    let _ = writeln!(
        out,
        "  {:<5} {:<24} {:<10} {:<9} {:<11} {:>8} {:>10} {:>10}",
        "rank", "worker", "device", "state", "phase", "step", "heartbeat", "collective"
    );
    for w in &status.workers {
        let phase = if w.phase.is_empty() { "-" } else { &w.phase };
        let age = format!("{:.1} s", w.heartbeat_age_ms as f64 / 1000.0);
        // A worker waiting in the rendezvous (or for admission) has no rank yet.
        let rank = if w.state == "waiting" { "-".to_string() } else { w.rank.to_string() };
        let _ = writeln!(
            out,
            "  {:<5} {:<24} {:<10} {:<9} {:<11} {:>8} {:>10} {:>10}",
            rank, w.worker_id, w.device, w.state, phase, w.last_step, age, w.collective_seq
        );
    }
    if !status.events.is_empty() {
        let _ = writeln!(out, "  generation changes (UTC):");
        for e in status.events.iter().rev().take(10).rev() {
            let secs = (e.at_unix_ms / 1000) % 86_400;
            let _ = writeln!(
                out,
                "    {:02}:{:02}:{:02} generation {} {}: {}",
                secs / 3600,
                secs / 60 % 60,
                secs % 60,
                e.generation,
                e.kind,
                e.detail
            );
        }
    }
    let live: Vec<_> = status.checkpoints.iter().filter(|c| !c.pruned).collect();
    if !live.is_empty() {
        let _ = writeln!(out, "  checkpoints ({} committed, {} kept):", status.checkpoints.len(), live.len());
        for c in live {
            let _ = writeln!(
                out,
                "    step {:>8}  epoch {} at sample {}  generation {}  {}",
                c.step, c.epoch, c.epoch_position, c.generation, c.path
            );
        }
    }
    let mut epochs: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for s in &status.epoch_segments {
        let mut part = format!(
            "[{}, {}) by generation {} ({}x{})",
            s.start, s.kept_end, s.generation, s.world_size, s.batch_size
        );
        if s.end > s.kept_end {
            part += &format!(" +{} rolled back", s.end - s.kept_end);
        }
        epochs.entry(s.epoch).or_default().push(part);
    }
    for (epoch, parts) in epochs.iter().rev().take(3).rev() {
        let _ = writeln!(out, "  epoch {epoch} samples: {}", parts.join(", "));
    }
    if let Some(eval) = status.history.iter().rev().find(|p| p.kind == MetricsKind::Eval as i32) {
        let map = eval.values.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let _ = write!(
            out,
            "  evaluation at step {} (all ranks merged):\n{}",
            eval.step,
            mtl_metrics::render_table(&map)
        );
    }
    // The latest value of every training key, and the step it was reported at.
    let mut latest: BTreeMap<&str, (u64, u32, f64)> = BTreeMap::new();
    for p in status.history.iter().filter(|p| p.kind == MetricsKind::Train as i32) {
        for (k, v) in &p.values {
            latest.insert(k, (p.step, p.rank, *v));
        }
    }
    if !latest.is_empty() {
        let _ = writeln!(out, "  train metrics (latest):");
        for (key, (step, rank, value)) in latest {
            let _ = writeln!(out, "    {key:<24} {value:>12.5}   step {step} rank {rank}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtl_proto::v1::{CheckpointInfo, EpochSegment, JobEvent, ResumeFrom, WorkerStatus};

    #[test]
    fn status_shows_workers_generation_changes_checkpoints_and_accounting() {
        let status = JobStatus {
            job_name: "j".into(),
            state: "running".into(),
            generation: 2,
            world_size: 2,
            config_hash: "abcd".into(),
            epoch: 1,
            epoch_position: 48,
            resume: Some(ResumeFrom {
                path: "step-40".into(),
                step: 40,
                epoch: 1,
                epoch_position: 16,
                generation: 1,
            }),
            workers: vec![
                WorkerStatus {
                    worker_id: "a".into(),
                    rank: 0,
                    state: "active".into(),
                    phase: "all-reduce".into(),
                    last_step: 44,
                    heartbeat_age_ms: 1500,
                    collective_seq: 91,
                    ..Default::default()
                },
                WorkerStatus {
                    worker_id: "b".into(),
                    rank: 1,
                    state: "detached".into(),
                    ..Default::default()
                },
            ],
            events: vec![JobEvent {
                at_unix_ms: (3600 + 120 + 5) * 1000,
                generation: 2,
                kind: "formed".into(),
                detail: "2 worker(s); after generation 1 ended: worker c lost".into(),
            }],
            checkpoints: vec![
                CheckpointInfo { step: 20, path: "step-20".into(), pruned: true, ..Default::default() },
                CheckpointInfo {
                    step: 40,
                    epoch: 1,
                    epoch_position: 16,
                    generation: 1,
                    path: "step-40".into(),
                    ..Default::default()
                },
            ],
            epoch_segments: vec![
                EpochSegment {
                    epoch: 1,
                    generation: 1,
                    world_size: 3,
                    batch_size: 8,
                    start: 0,
                    end: 48,
                    kept_end: 16,
                    samples: 100,
                },
                EpochSegment {
                    epoch: 1,
                    generation: 2,
                    world_size: 2,
                    batch_size: 8,
                    start: 16,
                    end: 48,
                    kept_end: 48,
                    samples: 100,
                },
            ],
            ..Default::default()
        };
        let text = render(&status);
        let line = |needle: &str| {
            text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle}:\n{text}"))
        };
        let a: Vec<&str> = line(" a ").split_whitespace().collect();
        assert_eq!(a, ["0", "a", "active", "all-reduce", "44", "1.5", "s", "91"]);
        let b: Vec<&str> = line(" b ").split_whitespace().collect();
        assert_eq!(b, ["1", "b", "detached", "-", "0", "0.0", "s", "0"], "an older worker's phase is '-'");
        assert!(line("01:02:05")
            .contains("generation 2 formed: 2 worker(s); after generation 1 ended: worker c lost"));
        assert!(line("resumed from").contains("checkpoint step 40 (step-40, epoch 1 at sample 16)"));
        assert!(text.contains("checkpoints (2 committed, 1 kept)") && !text.contains("step-20\n"), "{text}");
        assert!(line("epoch 1 samples")
            .ends_with("[0, 16) by generation 1 (3x8) +32 rolled back, [16, 48) by generation 2 (2x8)"));
    }
}
