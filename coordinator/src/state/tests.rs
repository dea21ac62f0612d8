use super::*;
use mtl_proto::v1::{CheckpointCommit, MetricsKind, MetricsReport, ShardRequest, Split};

/// A job state whose metrics file, state database and checkpoints live in a temporary
/// directory (kept alive by the caller).
fn new_state(cfg: JobConfig) -> (JobState, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = in_dir(cfg, dir.path());
    (JobState::new(cfg, Instant::now()).unwrap(), dir)
}

fn in_dir(mut cfg: JobConfig, dir: &std::path::Path) -> JobConfig {
    cfg.server.metrics_file = dir.join("metrics.jsonl").display().to_string();
    cfg.server.state_db = dir.join("state.db").display().to_string();
    cfg.checkpoint.dir = dir.join("checkpoints").display().to_string();
    cfg
}

fn cfg(min: u32, max: u32) -> JobConfig {
    let mut cfg = JobConfig::from_toml("[job]\nname = \"t\"\ntoken = \"secret\"\n").unwrap();
    cfg.rendezvous.min_workers = min;
    cfg.rendezvous.max_workers = max;
    cfg.rendezvous.heartbeat_interval_ms = 100;
    cfg.rendezvous.heartbeat_timeout_ms = 1_000;
    cfg
}

fn progress(step: u64) -> Progress {
    Progress { step, ..Default::default() }
}

impl JobState {
    /// A registration that joins the next generation (not a re-attach).
    fn register_new(&mut self, info: WorkerInfo, now: Instant) -> Result<Registered, CoordinatorError> {
        self.register(info, 0, 0, now)
    }
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
    assert_eq!(s.register_new(info("b"), now).unwrap(), Registered::Waiting);
    assert!(s.placement("b").is_none());
    assert_eq!(s.register_new(info("a"), now).unwrap(), Registered::Formed);
    let a = s.placement("a").unwrap();
    let b = s.placement("b").unwrap();
    assert_eq!((a.rank, b.rank, a.world_size, a.generation), (0, 1, 2, 1));
    assert_eq!(a.peers.iter().map(|p| p.peer_addr.as_str()).collect::<Vec<_>>(), ["a:1", "b:1"]);
    assert!(a.job_config_toml.contains("name = \"t\""));
    assert!(!a.job_config_toml.contains("secret"), "the token is not sent: {}", a.job_config_toml);
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
    s.register_new(info("a"), now).unwrap();
    assert_eq!(
        s.register_new(info("a"), now).unwrap(),
        Registered::Waiting,
        "a retried registration keeps its place"
    );
    let err = s.register_new(info("z"), now).unwrap_err();
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
    s.register_new(info("a"), now).unwrap();
    s.register_new(info("b"), now).unwrap();
    s.leave("a", 1, false, false, "").unwrap();
    assert_eq!(s.phase(), &Phase::Running);
    s.leave("b", 1, false, false, "").unwrap();
    assert_eq!(s.phase(), &Phase::Finished);
    assert!(matches!(s.register_new(info("c"), now), Err(CoordinatorError::JobOver { .. })));
}

#[test]
fn a_failed_worker_fails_the_job() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register_new(info("a"), now).unwrap();
    s.leave("a", 1, true, false, "out of memory").unwrap();
    assert!(matches!(s.phase(), Phase::Failed(m) if m.contains("out of memory")));
}

#[test]
fn silent_worker_is_lost_after_the_heartbeat_timeout() {
    let t0 = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register_new(info("a"), t0).unwrap();
    s.register_new(info("b"), t0).unwrap();
    s.heartbeat("a", 1, progress(5), t0 + Duration::from_millis(900)).unwrap();
    assert!(
        s.check_liveness(t0 + Duration::from_millis(1_000)).unwrap().is_empty(),
        "not past the timeout yet"
    );
    let lost = s.check_liveness(t0 + Duration::from_millis(1_500)).unwrap();
    assert_eq!(lost, ["b"]);
    // The generation ends, not the job: the survivor is told to regroup.
    assert_eq!(s.phase(), &Phase::Rendezvous);
    let (directive, reason) = s.heartbeat("a", 1, progress(6), t0 + Duration::from_millis(1_600)).unwrap();
    assert_eq!(directive, Directive::Regroup);
    assert!(reason.contains("b sent no heartbeat"), "{reason}");
    // No replacement within rendezvous.timeout_ms: the job fails, saying why.
    s.register_with(info("a"), 0, 6, Some(held(6, 1, "told to regroup")), t0).unwrap();
    let timeout = Duration::from_millis(s.cfg.rendezvous.timeout_ms);
    s.check_liveness(t0 + Duration::from_millis(1_499) + timeout).unwrap();
    assert_eq!(s.phase(), &Phase::Rendezvous, "still waiting for a replacement");
    s.check_liveness(t0 + Duration::from_millis(1_500) + timeout).unwrap();
    let Phase::Failed(reason) = s.phase() else { panic!("{:?}", s.phase()) };
    assert!(
        reason.contains("b sent no heartbeat")
            && reason.contains("1 worker(s) registered, rendezvous.min_workers = 2"),
        "{reason}"
    );
}

fn held(step: u64, generation: u64, reason: &str) -> Held {
    Held { step, epoch: 0, epoch_position: step * 15, generation, left_reason: reason.into() }
}

#[test]
fn a_failed_collective_ends_the_generation_and_the_most_advanced_survivor_is_the_state_root() {
    let t0 = Instant::now();
    let mut c = cfg(2, 3);
    c.train.batch_size = 5;
    let (mut s, _dir) = new_state(c);
    for id in ["a", "b", "c"] {
        s.register_new(info(id), t0).unwrap();
    }
    assert_eq!(s.placement("a").unwrap().world_size, 3);
    for id in ["a", "b", "c"] {
        s.shard(&shard_req(id, Split::Train, 100, "f"), t0).unwrap();
    }
    // Rank 0 reported 4 steps (of 3 x 5 samples), then died; b noticed first, at step 5.
    let in_collective = |step, seq| Progress { step, phase: WorkerPhase::AllReduce, collective_seq: seq };
    s.heartbeat("a", 1, in_collective(4, 5), t0).unwrap();
    s.heartbeat("b", 1, in_collective(5, 6), t0).unwrap();
    s.heartbeat("c", 1, in_collective(5, 6), t0).unwrap();
    let placement_before = s.placement("b").unwrap();
    assert!(placement_before.state_root.is_none(), "a fresh generation has no state root");
    let reason = "all_reduce: peer rank 0 failed: connection reset";
    assert_eq!(s.register_with(info("b"), 0, 5, Some(held(5, 1, reason)), t0).unwrap(), Registered::Waiting);
    assert_eq!(s.phase(), &Phase::Rendezvous);
    let (directive, told) = s.heartbeat("c", 1, progress(6), t0).unwrap();
    assert_eq!(directive, Directive::Regroup);
    assert!(
        told.contains("worker `b` (rank 1) left generation 1 at step 5") && told.contains(reason),
        "{told}"
    );
    assert!(
        told.contains("collective sequence: rank 0 at 5, rank 1 at 6, rank 2 at 6; behind: rank 0 (`a`)"),
        "the rank that stalled is named, not only the one that noticed: {told}"
    );
    // c had completed step 6: it becomes the state root of generation 2.
    let last_call = s.register_with(info("c"), 0, 6, Some(held(6, 1, &told)), t0).unwrap();
    let Registered::LastCall(deadline) = last_call else { panic!("{last_call:?}") };
    assert!(s.close_rendezvous(deadline).unwrap());
    let p = s.placement("b").unwrap();
    assert_eq!((p.generation, p.rank, p.world_size), (2, 0, 2));
    assert!(p.resume.is_none(), "continues from memory, not from a checkpoint");
    let root = p.state_root.unwrap();
    assert_eq!(
        (root.rank, root.worker_id.as_str(), root.step, root.epoch_position, root.generation),
        (1, "c", 6, 90, 1)
    );
    // Generation 1's part of epoch 0 reaches the root's position though its rank 0 only said 4.
    let status = s.status(t0);
    let seg = status.epoch_segments.iter().find(|g| g.generation == 1).unwrap();
    assert_eq!((seg.start, seg.end, seg.kept_end), (0, 90, 90));
    let formed = &status.events.last().unwrap().detail;
    assert!(
        formed.contains("continues from the memory of `c` (step 6, epoch 0 at sample 90, generation 1)"),
        "{formed}"
    );
    // Generation 2 continues the epoch at the root's position with 2 ranks.
    let mut req = shard_req("b", Split::Train, 100, "f");
    (req.generation, req.steps_done, req.epoch_position) = (2, 6, Some(90));
    let shard = s.shard(&req, t0).unwrap();
    assert_eq!((shard.epoch_position, shard.steps), (90, 1));
}

#[test]
fn without_a_survivor_holding_state_the_next_generation_resumes_from_the_checkpoint() {
    let t0 = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register_new(info("a"), t0).unwrap();
    s.check_liveness(t0 + Duration::from_secs(5)).unwrap();
    assert_eq!(s.phase(), &Phase::Rendezvous);
    s.register_new(info("z"), t0 + Duration::from_secs(5)).unwrap();
    let p = s.placement("z").unwrap();
    assert_eq!((p.generation, p.state_root.is_none()), (2, true));
}

#[test]
fn requests_for_another_generation_are_rejected() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register_new(info("a"), now).unwrap();
    assert!(matches!(
        s.heartbeat("a", 7, progress(0), now),
        Err(CoordinatorError::UnknownWorker { generation: 7, .. })
    ));
    assert!(matches!(s.heartbeat("x", 1, progress(0), now), Err(CoordinatorError::UnknownWorker { .. })));
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
        epoch_position: None,
    }
}

#[test]
fn shards_cover_the_split_and_mismatched_data_is_rejected() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register_new(info("a"), now).unwrap();
    s.register_new(info("b"), now).unwrap();
    let a = s.shard(&shard_req("a", Split::Train, 100, "f1"), now).unwrap();
    let b = s.shard(&shard_req("b", Split::Train, 100, "f1"), now).unwrap();
    assert_eq!(a.steps, b.steps);
    assert_eq!(a.steps, 100 / 16, "batch 8 per rank, 2 ranks");
    assert!(a.positions.iter().all(|p| !b.positions.contains(p)));
    let err = s.shard(&shard_req("b", Split::Train, 99, "f2"), now).unwrap_err();
    assert!(matches!(err, CoordinatorError::DatasetMismatch { .. }), "{err}");
    assert!(err.to_string().contains("99 samples (index f2) vs 100 samples (index f1)"), "{err}");
    let va = s.shard(&shard_req("a", Split::Val, 5, "v"), now).unwrap();
    let vb = s.shard(&shard_req("b", Split::Val, 5, "v"), now).unwrap();
    assert_eq!(va.positions.len() + vb.positions.len(), 5);
}

#[test]
fn metrics_are_appended_to_the_metrics_file_and_epoch_position_is_tracked() {
    let now = Instant::now();
    let (mut s, dir) = new_state(cfg(2, 2));
    s.register_new(info("a"), now).unwrap();
    s.register_new(info("b"), now).unwrap();
    let mut req = shard_req("a", Split::Train, 100, "f");
    req.steps_done = 0;
    s.shard(&req, now).unwrap();
    s.heartbeat("a", 1, progress(3), now).unwrap();
    let status = s.status(now);
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
    let dir = tempfile::tempdir().unwrap();
    c.server.state_db = dir.path().join("state.db").display().to_string();
    let err = JobState::new(c, Instant::now()).unwrap_err();
    assert!(err.to_string().contains("/proc/no-such-dir/metrics.jsonl"), "{err}");
}

#[test]
fn last_call_admits_workers_up_to_max_then_forms() {
    let t0 = Instant::now();
    let mut c = cfg(2, 4);
    c.rendezvous.last_call_ms = 1_000;
    let (mut s, _dir) = new_state(c.clone());
    assert_eq!(s.register_new(info("a"), t0).unwrap(), Registered::Waiting);
    assert_eq!(
        s.register_new(info("b"), t0).unwrap(),
        Registered::LastCall(t0 + Duration::from_millis(1_000))
    );
    assert!(!s.close_rendezvous(t0 + Duration::from_millis(999)).unwrap(), "still in the last call");
    assert_eq!(s.register_new(info("c"), t0).unwrap(), Registered::Waiting, "admitted during the last call");
    assert!(s.close_rendezvous(t0 + Duration::from_millis(1_000)).unwrap());
    assert_eq!(s.placement("c").unwrap().world_size, 3);

    // Reaching max_workers forms the generation without waiting.
    let (mut s, _dir) = new_state(c);
    for id in ["a", "b", "c"] {
        s.register_new(info(id), t0).unwrap();
    }
    assert_eq!(s.register_new(info("d"), t0).unwrap(), Registered::Formed);
    assert_eq!(s.placement("d").unwrap().world_size, 4);
}

/// The config hash the state computes, for commits.
fn commit(s: &JobState, worker: &str, generation: u64, step: u64, path: &str) -> CheckpointCommit {
    CheckpointCommit {
        job_token: String::new(),
        worker_id: worker.into(),
        generation,
        step,
        epoch: 0,
        epoch_position: step * 16,
        path: path.into(),
        config_hash: s.config_hash.clone(),
        ..Default::default()
    }
}

/// A checkpoint directory as a worker would leave it.
fn write_checkpoint(dir: &std::path::Path, step: u64) -> String {
    let name = format!("step-{step}");
    std::fs::create_dir_all(dir.join("checkpoints").join(&name)).unwrap();
    std::fs::write(dir.join("checkpoints").join(&name).join("manifest.json"), b"{}").unwrap();
    name
}

#[test]
fn commits_are_checked_recorded_and_pruned_beyond_keep_last() {
    let now = Instant::now();
    let mut c = cfg(1, 1);
    c.checkpoint.keep_last = 2;
    let (mut s, dir) = new_state(c);
    s.register_new(info("a"), now).unwrap();
    for step in [10, 20] {
        let name = write_checkpoint(dir.path(), step);
        let ack = s.commit_checkpoint(&commit(&s, "a", 1, step, &name), now).unwrap();
        assert!(ack.committed && ack.pruned.is_empty());
    }
    let name = write_checkpoint(dir.path(), 30);
    let ack = s.commit_checkpoint(&commit(&s, "a", 1, 30, &name), now).unwrap();
    assert_eq!(ack.pruned, ["step-10"]);
    assert!(!dir.path().join("checkpoints/step-10").exists(), "the directory is deleted");
    assert!(dir.path().join("checkpoints/step-20").exists());
    let status = s.status(now);
    assert_eq!(
        status.checkpoints.iter().map(|c| (c.step, c.pruned)).collect::<Vec<_>>(),
        [(10, true), (20, false), (30, false)]
    );

    // The checks: a foreign hash, a path outside the directory, a stranger.
    let mut bad = commit(&s, "a", 1, 40, "step-30");
    bad.config_hash = "0000".into();
    assert!(matches!(s.commit_checkpoint(&bad, now), Err(CoordinatorError::ConfigHashMismatch { .. })));
    let outside = dir.path().display().to_string();
    let err = s.commit_checkpoint(&commit(&s, "a", 1, 40, &outside), now).unwrap_err();
    assert!(matches!(&err, CoordinatorError::InvalidRequest { field: "path", .. }), "{err}");
    assert!(err.to_string().contains("not inside the checkpoint directory"), "{err}");
    let err = s.commit_checkpoint(&commit(&s, "a", 1, 40, "../state.db"), now).unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    assert!(matches!(
        s.commit_checkpoint(&commit(&s, "z", 1, 40, "step-30"), now),
        Err(CoordinatorError::UnknownWorker { .. })
    ));
}

#[test]
fn the_best_checkpoint_by_keep_best_survives_pruning() {
    let now = Instant::now();
    let mut c = cfg(1, 1);
    c.checkpoint.keep_last = 1;
    c.checkpoint.keep_best = "classification.accuracy".into();
    let (mut s, dir) = new_state(c);
    s.register_new(info("a"), now).unwrap();
    // Accuracy at steps 10, 20, 30: 2/2, 1/2, 0/2 (evaluations of one rank).
    for (step, correct) in [(10u64, 2usize), (20, 1), (30, 0)] {
        let mut stats = mtl_metrics::EvalStats::default();
        let mut cls = mtl_metrics::ClassificationStats::new(2).unwrap();
        for i in 0..2 {
            cls.add(0, if i < correct { 0 } else { 1 }).unwrap();
        }
        stats.classification = Some(cls);
        let report = MetricsReport {
            worker_id: "a".into(),
            generation: 1,
            kind: MetricsKind::Eval as i32,
            step,
            eval_stats_json: serde_json::to_vec(&stats).unwrap(),
            ..Default::default()
        };
        s.report_metrics(report, now).unwrap();
        let name = write_checkpoint(dir.path(), step);
        s.commit_checkpoint(&commit(&s, "a", 1, step, &name), now).unwrap();
    }
    let kept: Vec<u64> = s.status(now).checkpoints.iter().filter(|c| !c.pruned).map(|c| c.step).collect();
    assert_eq!(kept, [10, 30], "the best (step 10) and the newest");
    assert!(dir.path().join("checkpoints/step-10").exists());
    assert!(!dir.path().join("checkpoints/step-20").exists());
}

#[test]
fn a_restarted_coordinator_reloads_the_job_and_workers_re_attach() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let c = in_dir(cfg(2, 2), dir.path());
    let mut s = JobState::new(c.clone(), t0).unwrap();
    s.register_new(info("a"), t0).unwrap();
    s.register_new(info("b"), t0).unwrap();
    s.shard(&shard_req("a", Split::Train, 100, "f"), t0).unwrap();
    s.shard(&shard_req("b", Split::Train, 100, "f"), t0).unwrap();
    s.heartbeat("a", 1, progress(2), t0).unwrap();
    let name = write_checkpoint(dir.path(), 2);
    s.commit_checkpoint(&commit(&s, "a", 1, 2, &name), t0).unwrap();
    let report = MetricsReport {
        worker_id: "a".into(),
        generation: 1,
        kind: MetricsKind::Train as i32,
        step: 3,
        scalars: [("loss/cls".to_string(), 0.5)].into_iter().collect(),
        ..Default::default()
    };
    s.report_metrics(report, t0).unwrap();
    let before = s.status(t0);
    drop(s); // the coordinator dies

    let t1 = t0 + Duration::from_secs(5);
    let mut s = JobState::new(c.clone(), t1).unwrap();
    assert_eq!(s.phase(), &Phase::Running);
    let status = s.status(t1);
    assert_eq!(status.generation, 1);
    assert!(status.workers.iter().all(|w| w.state == "detached"), "{:?}", status.workers);
    assert_eq!(status.history, before.history, "the metrics history is back");
    assert_eq!(status.checkpoints, before.checkpoints);
    assert_eq!(status.epoch_segments, before.epoch_segments);
    assert_eq!((status.epoch, status.epoch_position), (0, 3 * 16), "rank 0's step 3 x 2 ranks x batch 8");
    assert_eq!(status.events.last().unwrap().kind, "coordinator_restarted");

    // Rank 1 re-attaches through Register, rank 0 through its next heartbeat.
    assert_eq!(s.register(info("b"), 1, 4, t1).unwrap(), Registered::Reattached);
    let placement = s.placement("b").unwrap();
    assert_eq!((placement.generation, placement.rank, placement.world_size), (1, 1, 2));
    assert_eq!(placement.peers[0].peer_addr, "a:1", "the placement is the stored one");
    let (directive, _) = s.heartbeat("a", 1, progress(4), t1).unwrap();
    assert_eq!(directive, Directive::Continue);
    let status = s.status(t1);
    assert!(status.workers.iter().all(|w| w.state == "active" && w.last_step == 4), "{:?}", status.workers);
    assert_eq!(status.epoch_position, 4 * 16);
    assert_eq!(status.events.iter().filter(|e| e.kind == "reattached").count(), 2);
    // No generation change: the shards stand, and the grace period no longer applies.
    let grace = Duration::from_millis(c.rendezvous.coordinator_grace_ms);
    s.heartbeat("a", 1, progress(5), t1 + grace).unwrap();
    s.heartbeat("b", 1, progress(5), t1 + grace).unwrap();
    assert!(s.check_liveness(t1 + grace + Duration::from_millis(1)).unwrap().is_empty());
    assert!(matches!(s.register(info("a"), 7, 0, t1), Err(CoordinatorError::StaleGeneration { .. })));
    let again = s.shard(&shard_req("b", Split::Train, 100, "f"), t0).unwrap();
    assert_eq!(again.epoch_position, 0, "the epoch still starts where generation 1 started it");
}

#[test]
fn workers_that_do_not_re_attach_within_the_grace_period_are_lost() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut c = in_dir(cfg(2, 2), dir.path());
    c.rendezvous.coordinator_grace_ms = 3_000;
    let mut s = JobState::new(c.clone(), t0).unwrap();
    s.register_new(info("a"), t0).unwrap();
    s.register_new(info("b"), t0).unwrap();
    drop(s);
    let mut s = JobState::new(c.clone(), t0).unwrap();
    s.heartbeat("a", 1, progress(1), t0 + Duration::from_millis(2_500)).unwrap();
    assert!(s.check_liveness(t0 + Duration::from_millis(2_999)).unwrap().is_empty());
    assert_eq!(s.check_liveness(t0 + Duration::from_millis(3_000)).unwrap(), ["b"]);
    assert_eq!(s.phase(), &Phase::Rendezvous, "the generation ends, the job goes on");
    let (directive, told) = s.heartbeat("a", 1, progress(2), t0 + Duration::from_millis(3_100)).unwrap();
    assert_eq!(directive, Directive::Regroup);
    let reason = told.strip_prefix("generation 1 ended: ").unwrap().to_string();
    assert!(reason.contains("b did not re-attach") && reason.contains("3000"), "{reason}");

    // Restarted again: the job goes on from scratch (no checkpoint) in generation 2.
    let mut s = JobState::new(c, t0).unwrap();
    assert_eq!(s.phase(), &Phase::Rendezvous);
    s.register_new(info("a"), t0).unwrap();
    assert_eq!(s.register_new(info("b"), t0).unwrap(), Registered::Formed);
    let placement = s.placement("a").unwrap();
    assert_eq!((placement.generation, placement.resume.is_none()), (2, true));
    let ended = s
        .status(t0)
        .events
        .iter()
        .filter(|e| e.kind == "ended")
        .map(|e| e.detail.clone())
        .collect::<Vec<_>>();
    assert_eq!(ended, [reason]);
}

#[test]
fn a_member_that_registers_afresh_ends_the_restored_generation_and_the_next_resumes() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let c = in_dir(cfg(2, 2), dir.path());
    let mut s = JobState::new(c.clone(), t0).unwrap();
    s.register_new(info("a"), t0).unwrap();
    s.register_new(info("b"), t0).unwrap();
    s.shard(&shard_req("a", Split::Train, 100, "f"), t0).unwrap();
    let name = write_checkpoint(dir.path(), 2);
    let mut req = commit(&s, "a", 1, 2, &name);
    req.epoch_position = 32;
    s.commit_checkpoint(&req, t0).unwrap();
    s.heartbeat("a", 1, progress(4), t0).unwrap();
    drop(s);

    // Everything restarted: the worker processes register with generation 0.
    let mut s = JobState::new(c, t0).unwrap();
    assert_eq!(s.register_new(info("b"), t0).unwrap(), Registered::Waiting);
    assert_eq!(s.phase(), &Phase::Rendezvous);
    assert_eq!(s.register_new(info("a"), t0).unwrap(), Registered::Formed);
    let placement = s.placement("a").unwrap();
    assert_eq!(placement.generation, 2);
    let resume = placement.resume.unwrap();
    assert_eq!(
        (resume.step, resume.epoch, resume.epoch_position, resume.path.as_str()),
        (2, 0, 32, "step-2")
    );
    // The epoch goes on from the checkpoint's position; what generation 1 trained past it is
    // rolled back.
    let mut req = shard_req("a", Split::Train, 100, "f");
    req.generation = 2;
    req.steps_done = 2;
    assert_eq!(s.shard(&req, t0).unwrap().epoch_position, 32);
    let mut disagree = shard_req("b", Split::Train, 100, "f");
    disagree.generation = 2;
    disagree.epoch_position = Some(48);
    let err = s.shard(&disagree, t0).unwrap_err();
    assert!(err.to_string().contains("rank 1 continues epoch 0 at sample 48"), "{err}");
    let segments = s.status(t0).epoch_segments;
    assert_eq!(
        segments.iter().map(|g| (g.generation, g.start, g.end, g.kept_end)).collect::<Vec<_>>(),
        [(1, 0, 64, 32), (2, 32, 32, 32)]
    );
    let events: Vec<String> = s.status(t0).events.iter().map(|e| e.kind.clone()).collect();
    assert_eq!(events, ["formed", "coordinator_restarted", "ended", "formed"]);
}

#[test]
fn a_finished_job_stays_finished() {
    let now = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let c = in_dir(cfg(1, 1), dir.path());
    let mut s = JobState::new(c.clone(), now).unwrap();
    s.register_new(info("a"), now).unwrap();
    s.leave("a", 1, false, false, "").unwrap();
    drop(s);
    let s = JobState::new(c, now).unwrap();
    assert_eq!(s.phase(), &Phase::Finished);
}

#[test]
fn heartbeats_carry_phase_and_collective_sequence_into_status() {
    let t0 = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register_new(info("a"), t0).unwrap();
    let p = Progress { step: 7, phase: WorkerPhase::AllReduce, collective_seq: 15 };
    s.heartbeat("a", 1, p, t0).unwrap();
    let w = s.status(t0 + Duration::from_millis(250)).workers.remove(0);
    assert_eq!(
        (w.phase.as_str(), w.last_step, w.collective_seq, w.heartbeat_age_ms),
        ("all-reduce", 7, 15, 250)
    );
    // An older worker sends no phase: shown empty, not as a wrong one.
    s.heartbeat("a", 1, progress(8), t0).unwrap();
    assert_eq!(s.status(t0).workers[0].phase, "");
}

fn train_report(worker: &str, generation: u64, step: u64) -> MetricsReport {
    MetricsReport {
        worker_id: worker.into(),
        generation,
        kind: MetricsKind::Train as i32,
        step,
        scalars: [("loss/cls".to_string(), 0.25)].into_iter().collect(),
        ..Default::default()
    }
}

#[test]
fn a_newcomer_waits_for_the_next_epoch_and_joins_the_regrouped_generation() {
    let t0 = Instant::now();
    let mut c = cfg(2, 3);
    (c.train.batch_size, c.rendezvous.last_call_ms) = (5, 1_000);
    let (mut s, dir) = new_state(c);
    s.register_new(info("a"), t0).unwrap();
    s.register_new(info("b"), t0).unwrap();
    assert!(s.close_rendezvous(t0 + Duration::from_millis(1_000)).unwrap());
    for id in ["a", "b"] {
        s.shard(&shard_req(id, Split::Train, 60, "f"), t0).unwrap();
    }

    // c registers while generation 1 (2 of max 3) trains epoch 0: it waits, past the
    // rendezvous timeout; a retry keeps its place, and a fourth worker finds no room.
    assert_eq!(s.register_new(info("c"), t0).unwrap(), Registered::AwaitingAdmission);
    assert_eq!(s.register_new(info("c"), t0).unwrap(), Registered::AwaitingAdmission);
    let err = s.register_new(info("d"), t0).unwrap_err();
    assert!(matches!(err, CoordinatorError::Full { waiting: 1, max: 3, .. }), "{err}");
    let later = t0 + Duration::from_millis(s.cfg.rendezvous.timeout_ms) + Duration::from_secs(1);
    for id in ["a", "b"] {
        s.heartbeat(id, 1, progress(5), later).unwrap();
    }
    s.check_liveness(later).unwrap();
    assert_eq!(s.phase(), &Phase::Running, "epoch 0 goes on");
    assert!(s.placement("c").is_none());
    let status = s.status(later);
    let requested: Vec<_> = status.events.iter().filter(|e| e.kind == "admission_requested").collect();
    assert_eq!(requested.len(), 1, "{:?}", status.events);
    assert!(
        requested[0].detail.contains("worker `c` asked to join generation 1")
            && requested[0].detail.contains("next epoch start or checkpoint commit"),
        "{}",
        requested[0].detail
    );
    assert!(status.workers.iter().any(|w| w.worker_id == "c" && w.state == "waiting"));

    // Epoch 1 begins: a's request is answered, then generation 1 ends for c.
    let mut req = shard_req("a", Split::Train, 60, "f");
    (req.epoch, req.steps_done) = (1, 6);
    let shard = s.shard(&req, later).unwrap();
    assert_eq!((shard.epoch, shard.epoch_position, shard.steps), (1, 0, 6));
    assert_eq!(s.phase(), &Phase::Rendezvous);
    let cause = "admitting worker(s) `c` at the start of epoch 1 (step 6)";
    let ended = s.status(later).events.iter().rev().find(|e| e.kind == "ended").cloned().unwrap();
    assert_eq!((ended.generation, ended.detail.as_str()), (1, cause));

    // b has not heard yet: its requests for generation 1 say so with ABORTED, except its
    // training scalars, which are still recorded.
    (req.worker_id, req.steps_done) = ("b".into(), 6);
    let err = s.shard(&req, later).unwrap_err();
    assert!(matches!(err, CoordinatorError::GenerationEnded { generation: 1, .. }), "{err}");
    assert!(err.to_string().contains(cause), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
    let name = write_checkpoint(dir.path(), 6);
    let err = s.commit_checkpoint(&commit(&s, "b", 1, 6, &name), later).unwrap_err();
    assert!(matches!(err, CoordinatorError::GenerationEnded { .. }), "{err}");
    s.report_metrics(train_report("b", 1, 6), later).unwrap();
    assert!(s.status(later).history.iter().any(|p| p.step == 6 && p.generation == 1));
    let eval = MetricsReport { kind: MetricsKind::Eval as i32, ..train_report("b", 1, 6) };
    let err = s.report_metrics(eval, later).unwrap_err();
    assert!(matches!(err, CoordinatorError::GenerationEnded { .. }), "{err}");
    // Not a member, or another generation: as before.
    let err = s.report_metrics(train_report("x", 1, 6), later).unwrap_err();
    assert!(matches!(err, CoordinatorError::UnknownWorker { .. }), "{err}");

    // The members are told to regroup and come back holding their state.
    for id in ["a", "b"] {
        let (directive, told) = s.heartbeat(id, 1, progress(6), later).unwrap();
        assert_eq!(directive, Directive::Regroup);
        assert!(told.contains(cause), "{told}");
    }
    let held = |reason: &str| Held {
        step: 6,
        epoch: 1,
        epoch_position: 0,
        generation: 1,
        left_reason: reason.into(),
    };
    assert!(matches!(
        s.register_with(info("b"), 0, 6, Some(held("told to regroup")), later).unwrap(),
        Registered::LastCall(_)
    ));
    let formed = s.register_with(info("a"), 0, 6, Some(held("told to regroup")), later).unwrap();
    assert_eq!(formed, Registered::Formed, "a, b and c: max_workers");
    let p = s.placement("c").unwrap();
    assert_eq!((p.generation, p.rank, p.world_size), (2, 2, 3));
    let root = p.state_root.unwrap();
    assert_eq!((root.worker_id.as_str(), root.rank, root.step, root.generation), ("a", 0, 6, 1));
    assert!(p.resume.is_none(), "the state comes from a survivor's memory");
    let formed = s.status(later).events.last().cloned().unwrap();
    assert_eq!((formed.kind.as_str(), formed.generation), ("formed", 2));
    assert!(
        formed.detail.contains("3 worker(s) in rank order: a, b, c")
            && formed.detail.contains("continues from the memory of `a`")
            && formed.detail.contains(cause),
        "{}",
        formed.detail
    );

    // Generation 2 trains the rest of epoch 1 with 3 ranks; nobody waits, nothing ends.
    let mut req = shard_req("c", Split::Train, 60, "f");
    (req.generation, req.epoch, req.steps_done, req.epoch_position) = (2, 1, 6, Some(0));
    assert_eq!(s.shard(&req, later).unwrap().steps, 4);
    assert_eq!(s.phase(), &Phase::Running);
}

#[test]
fn a_newcomer_is_admitted_after_the_next_checkpoint_commit() {
    let t0 = Instant::now();
    let mut c = cfg(1, 2);
    c.rendezvous.last_call_ms = 0;
    c.train.steps = 10;
    let (mut s, dir) = new_state(c.clone());
    assert_eq!(s.register_new(info("b"), t0).unwrap(), Registered::Formed);
    s.shard(&shard_req("b", Split::Train, 100, "f"), t0).unwrap();
    assert_eq!(s.register_new(info("a"), t0).unwrap(), Registered::AwaitingAdmission);
    assert!(matches!(s.register_new(info("z"), t0), Err(CoordinatorError::Full { .. })));
    s.report_metrics(train_report("b", 1, 4), t0).unwrap();
    assert_eq!(s.phase(), &Phase::Running, "a report is no admission point");

    // The checkpoint of the last step is none either: the members leave after it.
    {
        let (mut last, dir) = new_state(c);
        last.register_new(info("b"), t0).unwrap();
        last.shard(&shard_req("b", Split::Train, 100, "f"), t0).unwrap();
        last.register_new(info("a"), t0).unwrap();
        let name = write_checkpoint(dir.path(), 10);
        last.commit_checkpoint(&commit(&last, "b", 1, 10, &name), t0).unwrap();
        assert_eq!(last.phase(), &Phase::Running, "the final checkpoint admits nobody");
        last.leave("b", 1, false, false, "").unwrap();
        assert_eq!(last.phase(), &Phase::Finished, "the job finishes with its members");
    }

    let name = write_checkpoint(dir.path(), 4);
    let ack = s.commit_checkpoint(&commit(&s, "b", 1, 4, &name), t0).unwrap();
    assert!(ack.committed, "the commit is recorded before the generation ends");
    assert_eq!(s.status(t0).checkpoints.len(), 1);
    assert_eq!(s.phase(), &Phase::Rendezvous);
    let (directive, told) = s.heartbeat("b", 1, progress(4), t0).unwrap();
    assert_eq!(directive, Directive::Regroup);
    assert!(told.contains("admitting worker(s) `a` after checkpoint step 4"), "{told}");

    let formed = s.register_with(info("b"), 0, 4, Some(held(4, 1, "told to regroup")), t0).unwrap();
    assert_eq!(formed, Registered::Formed);
    let p = s.placement("a").unwrap();
    assert_eq!((p.generation, p.rank, p.world_size), (2, 0, 2), "ranks follow worker ids");
    let root = p.state_root.unwrap();
    assert_eq!(
        (root.worker_id.as_str(), root.rank, root.step),
        ("b", 1, 4),
        "the survivor, not the newcomer"
    );
}

// Stopping on request (`stop`).

#[test]
fn a_stop_tells_the_generation_to_checkpoint_and_ends_it_as_interrupted_when_all_left() {
    let now = Instant::now();
    let (mut s, dir) = new_state(cfg(2, 2));
    s.register_new(info("a"), now).unwrap();
    assert_eq!(s.register_new(info("b"), now).unwrap(), Registered::Formed);
    assert_eq!(s.heartbeat("a", 1, progress(3), now).unwrap().0, mtl_proto::v1::Directive::Continue);
    assert!(s.request_stop("SIGTERM").unwrap(), "a generation to wait for");
    let (directive, reason) = s.heartbeat("b", 1, progress(3), now).unwrap();
    assert_eq!(directive, mtl_proto::v1::Directive::Interrupt);
    assert!(reason.contains("SIGTERM"), "{reason}");
    assert!(!s.stop_done());

    let step_dir = dir.path().join("checkpoints").join("step-4");
    std::fs::create_dir_all(&step_dir).unwrap();
    let commit = CheckpointCommit {
        job_token: "secret".into(),
        worker_id: "a".into(),
        generation: 1,
        step: 4,
        epoch: 0,
        epoch_position: 32,
        path: "step-4".into(),
        config_hash: s.config_hash.clone(),
        stopping: true,
    };
    s.heartbeat("a", 1, progress(4), now).unwrap();
    s.commit_checkpoint(&commit, now).unwrap();
    s.leave("b", 1, false, true, "").unwrap();
    assert_eq!(s.phase(), &Phase::Running, "rank 0 is still in");
    s.leave("a", 1, false, true, "").unwrap();
    assert!(s.stop_done());
    assert_eq!(s.phase(), &Phase::Rendezvous, "not finished, not failed");
    assert_eq!(s.resume_step(), Some(4));
    let status = s.status(now);
    let ended = status.events.iter().rev().find(|e| e.kind == "ended").unwrap();
    assert!(ended.detail.contains("stopped on request at step 4"), "{}", ended.detail);
    assert!(ended.detail.contains("checkpoint step 4 (step-4) committed"), "{}", ended.detail);

    // A restarted coordinator resumes the job from that checkpoint.
    let cfg = s.cfg.clone();
    drop(s);
    let mut s = JobState::new(cfg, now).unwrap();
    assert_eq!(s.phase(), &Phase::Rendezvous);
    s.register_new(info("a"), now).unwrap();
    s.register_new(info("b"), now).unwrap();
    assert_eq!(s.placement("a").unwrap().resume.unwrap().step, 4);
}

#[test]
fn workers_stopped_without_the_coordinator_leave_the_job_waiting_for_new_ones() {
    let now = Instant::now();
    let (mut s, _dir) = new_state(cfg(1, 1));
    s.register_new(info("a"), now).unwrap();
    s.leave("a", 1, false, true, "").unwrap();
    assert_eq!(s.phase(), &Phase::Rendezvous, "interrupted, not finished");
    assert!(!s.stop_done(), "the coordinator itself was not asked to stop");
    assert_eq!(s.register_new(info("a"), now).unwrap(), Registered::Formed);
    assert_eq!(s.placement("a").unwrap().generation, 2);
}

#[test]
fn a_stop_without_a_training_generation_is_done_at_once() {
    let (mut s, _dir) = new_state(cfg(2, 2));
    s.register_new(info("a"), Instant::now()).unwrap();
    assert!(!s.request_stop("SIGINT").unwrap());
    assert!(s.stop_done());
    let refused = s.register_new(info("b"), Instant::now()).unwrap_err();
    assert!(refused.to_string().contains("the coordinator is stopping"), "{refused}");
}
