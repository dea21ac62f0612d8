//! Requests a broken or hostile client may send, over real gRPC on loopback: each RPC refuses a
//! request larger than its bound with RESOURCE_EXHAUSTED naming the RPC, the size and the
//! limit; a checkpoint path that leaves the checkpoint directory is refused; and after all of
//! it the job goes on and finishes. Workers are simulated over gRPC.
mod common;

use common::{job, FakeWorker, InProcessCoordinator};
use mtl_coordinator::JobOutcome;
use mtl_proto::v1::{
    CheckpointCommit, Directive, HeartbeatRequest, LeaveRequest, MetricsKind, MetricsReport, RegisterRequest,
    ShardRequest, StatusRequest,
};
use tonic::Code;

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, rpc: &str, limit: usize) {
    let status = result.expect_err("an oversized request must be refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{rpc}: {status:?}");
    let message = status.message();
    assert!(
        message.starts_with(&format!("{rpc} request of "))
            && message.ends_with(&format!("its limit of {limit} bytes")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_per_rpc_and_the_job_goes_on() {
    let cfg = job("[rendezvous]\nmin_workers = 1\nheartbeat_timeout_ms = 20000\n[train]\nbatch_size = 4\n");
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let mut w = FakeWorker::connect(&coord.url, &coord.token, "w").await;
    let token = coord.token.clone();
    let big = |n: usize| "x".repeat(n);

    // Register: 64 KiB. An oversized one is refused before it joins anything.
    let register = RegisterRequest {
        job_token: token.clone(),
        worker_id: "w".into(),
        host: big(70_000),
        ..Default::default()
    };
    refused(w.client.register(register).await, "Register", 64 << 10);
    let placement = w.register(0, 0).await.unwrap();
    assert_eq!((placement.generation, placement.world_size), (1, 1));

    // Heartbeat: 4 KiB.
    let heartbeat = HeartbeatRequest {
        job_token: token.clone(),
        worker_id: big(5000),
        generation: 1,
        ..Default::default()
    };
    refused(w.client.heartbeat(heartbeat).await, "Heartbeat", 4 << 10);
    assert_eq!(w.heartbeat(0).await.unwrap().directive, Directive::Continue as i32);

    // GetShard: 4 KiB.
    let shard =
        ShardRequest { job_token: token.clone(), dataset_fingerprint: big(5000), ..Default::default() };
    refused(w.client.get_shard(shard).await, "GetShard", 4 << 10);
    w.train_shard(0, 100, 0, None).await.unwrap();

    // ReportMetrics: scalars 64 KiB; evaluation statistics up to the server's bound, so a
    // megabyte of them passes the size check (and fails later, as the garbage it is).
    let scalars = (0..5000).map(|i| (format!("loss/{i:012}"), 1.0)).collect();
    let train = MetricsReport {
        job_token: token.clone(),
        worker_id: "w".into(),
        generation: 1,
        kind: MetricsKind::Train as i32,
        step: 1,
        scalars,
        ..Default::default()
    };
    refused(w.client.report_metrics(train).await, "ReportMetrics", 64 << 10);
    let eval = MetricsReport {
        job_token: token.clone(),
        worker_id: "w".into(),
        generation: 1,
        kind: MetricsKind::Eval as i32,
        step: 1,
        eval_stats_json: vec![b' '; 1 << 20],
        ..Default::default()
    };
    let answer = w.client.report_metrics(eval).await.expect_err("not statistics");
    assert_ne!(answer.code(), Code::ResourceExhausted, "{answer:?}");
    w.report_train(1, 0, 0.5).await.unwrap();

    // CommitCheckpoint: 16 KiB; and a path outside the checkpoint directory is refused.
    let commit = |path: String| CheckpointCommit {
        job_token: token.clone(),
        worker_id: "w".into(),
        generation: 1,
        step: 1,
        path,
        config_hash: placement.config_hash.clone(),
        ..Default::default()
    };
    refused(w.client.commit_checkpoint(commit(big(20_000))).await, "CommitCheckpoint", 16 << 10);
    let outside = std::env::temp_dir().display().to_string();
    for path in ["../../../etc".to_string(), outside] {
        let status = w.client.commit_checkpoint(commit(path.clone())).await.expect_err("outside");
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(status.message().contains("invalid request field `path`"), "{}", status.message());
    }

    // Leave (64 KiB) and GetStatus (4 KiB): an oversized failure report does not end the job.
    let leave = LeaveRequest {
        job_token: token.clone(),
        worker_id: "w".into(),
        generation: 1,
        failed: true,
        message: big(70_000),
        ..Default::default()
    };
    refused(w.client.leave(leave).await, "Leave", 64 << 10);
    refused(w.client.get_status(StatusRequest { job_token: big(5000) }).await, "GetStatus", 4 << 10);

    let status = coord.status().await;
    assert_eq!(status.state, "running", "{}", status.message);
    assert!(status.checkpoints.is_empty(), "nothing was committed");
    assert_eq!(status.history.len(), 1, "only the well-formed report is recorded");
    w.leave().await.unwrap();
    assert_eq!(coord.report().await.outcome, JobOutcome::Finished);
}

/// The peak resident memory of process `pid` in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_request_is_refused_from_its_frame_header_without_being_read() {
    // A coordinator process; a 192 MiB heartbeat (under the server's 256 MiB message bound) is
    // refused from the length its frame declares: the coordinator's peak memory stays far below
    // the message's size, which decoding it would have needed once or twice over.
    let dir = tempfile::tempdir().unwrap();
    let cfg = job("[rendezvous]\nmin_workers = 1\n");
    let file = dir.path().join("job.toml");
    std::fs::write(&file, cfg.to_toml()).unwrap();
    let addr_file = dir.path().join("addr");
    let mut coordinator = std::process::Command::new(common::bin("coordinator"))
        .args(["serve", "--config", file.to_str().unwrap(), "--addr-file", addr_file.to_str().unwrap()])
        .args(["--set", &format!("server.state_db={}", dir.path().join("state.db").display())])
        .args(["--set", &format!("server.metrics_file={}", dir.path().join("metrics.jsonl").display())])
        .env("MTL_JOB_TOKEN", "t0k")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{}", common::bound_address(&addr_file));
    let mut client = mtl_proto::v1::coordinator_client::CoordinatorClient::connect(url).await.unwrap();
    let size = 192usize << 20;
    let heartbeat = HeartbeatRequest {
        job_token: "t0k".into(),
        worker_id: "x".repeat(size),
        generation: 1,
        ..Default::default()
    };
    refused(client.heartbeat(heartbeat).await, "Heartbeat", 4 << 10);
    let peak = peak_rss(coordinator.id());
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    assert!(peak < (size as u64) / 2, "the coordinator peaked at {} MiB", peak >> 20);
}
