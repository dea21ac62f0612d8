use super::*;

/// A job state whose metrics file lives in a temporary directory (kept alive by the caller).
fn new_state(cfg: JobConfig) -> (JobState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cfg;
    cfg.server.metrics_file = dir.path().join("metrics.jsonl").display().to_string();
    (JobState::new(cfg).unwrap(), dir)
}

fn cfg(min: u32, max: u32) -> JobConfig {
    let mut cfg = JobConfig::from_toml("[job]\nname = \"t\"\ntoken = \"secret\"\n").unwrap();
    cfg.rendezvous.min_workers = min;
    cfg.rendezvous.max_workers = max;
    cfg.rendezvous.heartbeat_interval_ms = 100;
    cfg.rendezvous.heartbeat_timeout_ms = 1_000;
    cfg
}

fn info(id: &str) -> WorkerInfo {
    WorkerInfo {
        worker_id: id.into(),
        host: "h".into(),
        device: "cpu".into(),
        peer_addr: format!("{id}:1"),
        nccl_unique_id: id.as_bytes().to_vec(),
    }
}

#[test]
fn generation_forms_at_min_workers_with_ranks_by_worker_id() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    assert_eq!(s.register(info("b"), now).unwrap(), Registered::Waiting);
    assert!(s.placement("b").is_none());
    assert_eq!(s.register(info("a"), now).unwrap(), Registered::Formed);
    let a = s.placement("a").unwrap();
    let b = s.placement("b").unwrap();
    assert_eq!((a.rank, b.rank, a.world_size, a.generation), (0, 1, 2, 1));
    assert_eq!(a.peers.iter().map(|p| p.peer_addr.as_str()).collect::<Vec<_>>(), ["a:1", "b:1"]);
    assert!(a.job_config_toml.contains("name = \"t\""));
    assert_eq!(
        (a.nccl_unique_id.as_slice(), b.nccl_unique_id.as_slice()),
        (&b"a"[..], &b"a"[..]),
        "rank 0's id for all"
    );
    assert_eq!(s.phase(), &Phase::Running);
}

#[test]
fn full_generation_rejects_newcomers_but_accepts_retries() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register(info("a"), now).unwrap();
    assert_eq!(
        s.register(info("a"), now).unwrap(),
        Registered::Waiting,
        "a retried registration keeps its place"
    );
    let err = s.register(info("z"), now).unwrap_err();
    assert!(matches!(err, CoordinatorError::Full { .. }), "{err}");
}

#[test]
fn wrong_token_is_rejected() {
    let (s, _dir) = new_state(cfg(1, 1));
    assert!(matches!(s.check_token("nope"), Err(CoordinatorError::BadToken)));
    assert!(s.check_token("secret").is_ok());
}

#[test]
fn job_finishes_when_every_member_left() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register(info("a"), now).unwrap();
    s.register(info("b"), now).unwrap();
    s.leave("a", 1, false, "").unwrap();
    assert_eq!(s.phase(), &Phase::Running);
    s.leave("b", 1, false, "").unwrap();
    assert_eq!(s.phase(), &Phase::Finished);
    assert!(matches!(s.register(info("c"), now), Err(CoordinatorError::JobOver { .. })));
}

#[test]
fn a_failed_worker_fails_the_job() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register(info("a"), now).unwrap();
    s.leave("a", 1, true, "out of memory").unwrap();
    assert!(matches!(s.phase(), Phase::Failed(m) if m.contains("out of memory")));
}

#[test]
fn silent_worker_is_lost_after_the_heartbeat_timeout() {
    let t0 = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register(info("a"), t0).unwrap();
    s.register(info("b"), t0).unwrap();
    s.heartbeat("a", 1, 5, t0 + Duration::from_millis(900)).unwrap();
    assert!(s.check_liveness(t0 + Duration::from_millis(1_000)).is_empty(), "not past the timeout yet");
    let lost = s.check_liveness(t0 + Duration::from_millis(1_500));
    assert_eq!(lost, ["b"]);
    assert!(matches!(s.phase(), Phase::Failed(m) if m.contains('b')));
    let (directive, reason) = s.heartbeat("a", 1, 6, t0 + Duration::from_millis(1_600)).unwrap();
    assert_eq!(directive, Directive::Stop);
    assert!(reason.contains("no heartbeat"));
}

#[test]
fn requests_for_another_generation_are_rejected() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register(info("a"), now).unwrap();
    assert!(matches!(
        s.heartbeat("a", 7, 0, now),
        Err(CoordinatorError::UnknownWorker { generation: 7, .. })
    ));
    assert!(matches!(s.heartbeat("x", 1, 0, now), Err(CoordinatorError::UnknownWorker { .. })));
}

fn shard_req(worker: &str, split: Split, samples: u64, fingerprint: &str) -> ShardRequest {
    ShardRequest {
        job_token: String::new(),
        worker_id: worker.into(),
        generation: 1,
        split: split as i32,
        epoch: 0,
        dataset_samples: samples,
        dataset_fingerprint: fingerprint.into(),
        steps_done: 0,
    }
}

#[test]
fn shards_cover_the_split_and_mismatched_data_is_rejected() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register(info("a"), now).unwrap();
    s.register(info("b"), now).unwrap();
    let a = s.shard(&shard_req("a", Split::Train, 100, "f1")).unwrap();
    let b = s.shard(&shard_req("b", Split::Train, 100, "f1")).unwrap();
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.steps, 100 / 16, "batch 8 per rank, 2 ranks");
    assert!(a.positions.iter().all(|p| !b.positions.contains(p)));
    let err = s.shard(&shard_req("b", Split::Train, 99, "f2")).unwrap_err();
    assert!(matches!(err, CoordinatorError::DatasetMismatch { .. }), "{err}");
    assert!(err.to_string().contains("99 samples (index f2) vs 100 samples (index f1)"), "{err}");
    let va = s.shard(&shard_req("a", Split::Val, 5, "v")).unwrap();
    let vb = s.shard(&shard_req("b", Split::Val, 5, "v")).unwrap();
    assert_eq!(va.positions.len() + vb.positions.len(), 5);
}

#[test]
fn metrics_are_appended_to_the_metrics_file_and_epoch_position_is_tracked() {
    let now = Instant::now();
    let (mut s, dir) = new_state(cfg(2, 2));
    s.register(info("a"), now).unwrap();
    s.register(info("b"), now).unwrap();
    let mut req = shard_req("a", Split::Train, 100, "f");
    req.steps_done = 0;
    s.shard(&req).unwrap();
    s.heartbeat("a", 1, 3, now).unwrap();
    let status = s.status();
    assert_eq!((status.epoch, status.epoch_position), (0, 3 * 2 * 8), "3 steps x 2 ranks x batch 8");
    let report = MetricsReport {
        worker_id: "a".into(),
        generation: 1,
        kind: MetricsKind::Train as i32,
        step: 3,
        scalars: [("loss/cls".to_string(), 0.5)].into_iter().collect(),
        ..Default::default()
    };
    s.report_metrics(report, now).unwrap();
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 1);
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["step"].as_u64(), v["values"]["loss/cls"].as_f64()),
        (Some("train"), Some(3), Some(0.5))
    );
}

#[test]
fn an_unwritable_metrics_file_is_named() {
    let mut c = cfg(1, 1);
    c.server.metrics_file = "/proc/no-such-dir/metrics.jsonl".into();
    let err = JobState::new(c).unwrap_err();
    assert!(err.to_string().contains("/proc/no-such-dir/metrics.jsonl"), "{err}");
}

#[test]
fn last_call_admits_workers_up_to_max_then_forms() {
    let t0 = Instant::now();
    let mut c = cfg(2, 4);
    c.rendezvous.last_call_ms = 1_000;
    let (mut s, _dir) = new_state(c.clone());
    assert_eq!(s.register(info("a"), t0).unwrap(), Registered::Waiting);
    assert_eq!(s.register(info("b"), t0).unwrap(), Registered::LastCall(t0 + Duration::from_millis(1_000)));
    assert!(!s.close_rendezvous(t0 + Duration::from_millis(999)), "still in the last call");
    assert_eq!(s.register(info("c"), t0).unwrap(), Registered::Waiting, "admitted during the last call");
    assert!(s.close_rendezvous(t0 + Duration::from_millis(1_000)));
    assert_eq!(s.placement("c").unwrap().world_size, 3);

    // Reaching max_workers forms the generation without waiting.
    let (mut s, _dir) = new_state(c);
    for id in ["a", "b", "c"] {
        s.register(info(id), t0).unwrap();
    }
    assert_eq!(s.register(info("d"), t0).unwrap(), Registered::Formed);
    assert_eq!(s.placement("d").unwrap().world_size, 4);
}
