//! Coordinator + worker processes on loopback: registration, ranks, reported losses.
mod common;

use common::{job, spawn_worker, wait, InProcessCoordinator};
use mtl_coordinator::JobOutcome;
use mtl_proto::v1::MetricsKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_get_distinct_ranks_train_and_report() {
    let coord = InProcessCoordinator::start(job(
        "[rendezvous]\nmin_workers = 2\n[train]\nsteps = 1\nbatch_size = 4\n",
    ))
    .await;
    // Started in reverse id order: ranks must follow the ids, not arrival.
    let b = spawn_worker(&coord.url, &coord.token, "worker-b");
    let a = spawn_worker(&coord.url, &coord.token, "worker-a");
    let (code_a, err_a) = wait(a).await;
    let (code_b, err_b) = wait(b).await;
    assert_eq!(code_a, Some(0), "worker a:\n{err_a}");
    assert_eq!(code_b, Some(0), "worker b:\n{err_b}");

    let report = coord.report().await;
    assert_eq!(report.outcome, JobOutcome::Finished);
    let status = report.status;
    assert_eq!(status.state, "finished");
    assert_eq!(status.world_size, 2);
    let mut ranks: Vec<(String, u32)> =
        status.workers.iter().map(|w| (w.worker_id.clone(), w.rank)).collect();
    ranks.sort();
    assert_eq!(ranks, [("worker-a".to_string(), 0), ("worker-b".to_string(), 1)]);

    let losses: Vec<(u32, f64)> = status
        .history
        .iter()
        .filter(|p| p.kind == MetricsKind::Train as i32)
        .map(|p| (p.rank, p.values["loss/cls"]))
        .collect();
    // Rank 0 reports the losses averaged over both ranks.
    assert_eq!(losses.len(), 1, "one report for the one step: {losses:?}");
    assert_eq!(losses[0].0, 0);
    assert!(losses[0].1.is_finite() && losses[0].1 > 0.0, "{losses:?}");
    assert!(status.workers.iter().all(|w| w.last_step == 1), "{:?}", status.workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_with_a_clear_error() {
    let coord = InProcessCoordinator::start(job("")).await;
    let w = spawn_worker(&coord.url, "not-the-token", "w");
    let (code, stderr) = wait(w).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("job token does not match"), "{stderr}");
    assert_eq!(coord.stop().await.outcome, JobOutcome::Interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_coordinator_fails_naming_the_address() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, stderr) = wait(spawn_worker(&url, "t0k", "w")).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&url), "{stderr}");
}

async fn run_job(min: u32, max: u32, last_call_ms: u64, workers: usize) -> mtl_coordinator::JobReport {
    let data = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nmin_workers = {min}\nmax_workers = {max}\nlast_call_ms = {last_call_ms}\n[train]\nsteps = 1\nbatch_size = 2\n",
        common::tiny_data(data.path(), 24)
    );
    let coord = InProcessCoordinator::start(job(&body)).await;
    let children: Vec<_> =
        (0..workers).map(|i| spawn_worker(&coord.url, &coord.token, &format!("w{i}"))).collect();
    let report = coord.report().await;
    for c in children {
        let (code, stderr) = wait(c).await;
        assert_eq!(code, Some(0), "{stderr}");
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_beyond_min_join_during_the_last_call() {
    // min 1, max 2: the first worker opens a long last call; the second fills the job at once.
    let report = run_job(1, 2, 60_000, 2).await;
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.status.world_size, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generation_forms_when_the_last_call_ends() {
    // min 1, max 3, one worker: the generation forms with it when the 200 ms last call ends.
    let report = run_job(1, 3, 200, 1).await;
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.status.world_size, 1);
}
