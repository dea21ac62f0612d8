//! A worker killed mid-training when the job needs two: the survivor regroups, no replacement
//! comes within `rendezvous.timeout_ms`, and the coordinator fails the job naming the cause; the
//! surviving worker exits with an error instead of hanging. (With enough survivors the job goes
//! on: tests/recovery.rs.)
mod common;

use std::time::{Duration, Instant};

use common::{job, spawn_worker, tiny_data, wait, InProcessCoordinator};
use mtl_coordinator::JobOutcome;

/// Fault tests run one at a time: they time heartbeats, which load from a parallel test delays.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_fails_the_job_within_the_timeout() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nmin_workers = 2\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 5000\ntimeout_ms = 3000\n\
         coordinator_grace_ms = 5000\n[comm]\ntimeout_ms = 3000\n[train]\nsteps = 100000\nbatch_size = 2\n\
         log_every_steps = 1\n",
        tiny_data(&dir.path().join("data"), 32)
    );
    let coord = InProcessCoordinator::start(job(&body)).await;
    let survivor = spawn_worker(&coord.url, &coord.token, "a");
    let mut victim = spawn_worker(&coord.url, &coord.token, "b");
    // Kill once training is under way: rank 0 has reported a few steps.
    loop {
        let status = coord.status().await;
        if status.history.len() >= 3 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the live status, not syncing
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = Instant::now();
    let report = coord.report().await;
    let JobOutcome::Failed(reason) = &report.outcome else { panic!("job must fail: {:?}", report.outcome) };
    assert!(reason.contains('b') || reason.contains("failed"), "{reason}");
    let (code, stderr) = wait(survivor).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("peer rank 1") || stderr.contains("stopped by the coordinator"),
        "survivor says why: {stderr}"
    );
    assert!(killed_at.elapsed() < Duration::from_secs(20), "no hang");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_stop_when_the_coordinator_is_gone() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 5000\ncoordinator_grace_ms = 5000\n\
         [train]\nsteps = 100000\nbatch_size = 2\nlog_every_steps = 100000\n",
        // 1600 training images: an epoch is 800 steps, so the worker makes no RPC but heartbeats
        // for seconds after the coordinator stops; the grace period is what stops it.
        tiny_data(&dir.path().join("data"), 2000)
    );
    let coord = InProcessCoordinator::start(job(&body)).await;
    let worker = spawn_worker(&coord.url, &coord.token, "a");
    // Stop the coordinator once the worker is training (its heartbeats carry its step).
    loop {
        if coord.status().await.workers.iter().any(|w| w.last_step > 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the live status, not syncing
    }
    coord.stop().await;
    let stopped_at = Instant::now();
    let (code, stderr) = wait(worker).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("did not answer heartbeats for 5000 ms"), "{stderr}");
    assert!(stopped_at.elapsed() < Duration::from_secs(20), "no hang");
}
