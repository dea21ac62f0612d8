//! `coordinator status`: fetch a job's status over gRPC and render it as a table.
use std::collections::BTreeMap;
use std::fmt::Write;

use mtl_proto::v1::coordinator_client::CoordinatorClient;
use mtl_proto::v1::{JobStatus, MetricsKind, StatusRequest};

/// Fetches the status of the job served at `addr` and prints it to stdout.
pub async fn print(addr: &str, token: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut client = CoordinatorClient::connect(addr.to_string())
        .await
        .with_context(|| format!("cannot reach the coordinator at {addr}"))?
        .max_decoding_message_size(mtl_proto::MAX_MESSAGE_BYTES);
    let status = client.get_status(StatusRequest { job_token: token.to_string() }).await?.into_inner();
    print!("{}", render(&status));
    Ok(())
}

/// A human-readable summary: job state, workers, and the latest metrics of each kind.
pub fn render(status: &JobStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}: {} (generation {}, {} workers)",
        status.job_name, status.state, status.generation, status.world_size
    );
    if status.state == "running" {
        let _ = writeln!(out, "  epoch {}, {} samples of it consumed", status.epoch, status.epoch_position);
    }
    if !status.message.is_empty() {
        let _ = writeln!(out, "  {}", status.message);
    }
    let _ = writeln!(out, "  {:<5} {:<24} {:<10} {:<8} {:>8}", "rank", "worker", "device", "state", "step");
    for w in &status.workers {
        let _ = writeln!(
            out,
            "  {:<5} {:<24} {:<10} {:<8} {:>8}",
            w.rank, w.worker_id, w.device, w.state, w.last_step
        );
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
