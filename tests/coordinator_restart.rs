//! A coordinator killed mid-job and started again on the same state database: workers of the
//! running generation re-attach and go on; workers that restarted too start a new generation
//! from the newest committed checkpoint. Real coordinators in-process, workers simulated over
//! gRPC (the worker side of the protocol is tested with real processes elsewhere).
mod common;

use common::{job, FakeWorker, InProcessCoordinator};
use mtl_coordinator::JobOutcome;
use mtl_proto::v1::{Directive, JobStatus};

const SAMPLES: u64 = 200;

fn config() -> mtl_coordinator::JobConfig {
    job("[rendezvous]\nmin_workers = 2\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 20000\n\
         coordinator_grace_ms = 20000\n[train]\nbatch_size = 4\n[checkpoint]\nkeep_last = 1\n")
}

/// A checkpoint directory as rank 0 leaves it, inside the job's checkpoint dir.
fn write_checkpoint(cfg: &mtl_coordinator::JobConfig, step: u64) -> String {
    let name = format!("step-{step}");
    let dir = cfg.checkpoint.dir_path(&cfg.job.name).join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), b"{}").unwrap();
    name
}

/// Two workers register together and get their first train shard; rank 0 trains `steps`
/// steps, reports and commits a checkpoint at each step in `commit_at`.
async fn train(
    coord: &InProcessCoordinator,
    cfg: &mtl_coordinator::JobConfig,
    steps: u64,
    commit_at: &[u64],
) -> (FakeWorker, FakeWorker, String) {
    let mut a = FakeWorker::connect(&coord.url, &coord.token, "a").await;
    let mut b = FakeWorker::connect(&coord.url, &coord.token, "b").await;
    let (pa, pb) = tokio::join!(a.register(0, 0), b.register(0, 0));
    let (pa, pb) = (pa.unwrap(), pb.unwrap());
    assert_eq!((pa.rank, pb.rank, pa.generation), (0, 1, 1));
    assert!(pa.resume.is_none(), "a fresh job resumes from nothing");
    a.train_shard(0, SAMPLES, 0, None).await.unwrap();
    b.train_shard(0, SAMPLES, 0, None).await.unwrap();
    for step in 1..=steps {
        a.heartbeat(step).await.unwrap();
        b.heartbeat(step).await.unwrap();
        a.report_train(step, 0, 1.0 / step as f64).await.unwrap();
        if commit_at.contains(&step) {
            let name = write_checkpoint(cfg, step);
            let ack = a.commit(&name, step, 0, step * 8, &pa.config_hash).await.unwrap();
            assert!(ack.committed);
        }
    }
    (a, b, pa.config_hash)
}

fn kinds(status: &JobStatus) -> Vec<&str> {
    status.events.iter().map(|e| e.kind.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_re_attach_to_a_restarted_coordinator_and_nothing_is_lost() {
    let cfg = config();
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let (_, _, hash) = train(&coord, &cfg, 6, &[3, 5]).await;
    let before = coord.status().await;
    assert_eq!(before.checkpoints.iter().filter(|c| !c.pruned).count(), 1, "keep_last = 1");
    assert!(!cfg.checkpoint.dir_path("test").join("step-3").exists(), "step-3 was pruned");
    coord.kill().await;

    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let after = coord.status().await;
    assert_eq!((after.state.as_str(), after.generation), ("running", 1));
    assert!(after.workers.iter().all(|w| w.state == "detached"), "{:?}", after.workers);
    assert_eq!(after.history, before.history, "no metric point lost");
    assert_eq!(after.checkpoints, before.checkpoints, "no committed checkpoint lost");
    assert_eq!(after.epoch_segments, before.epoch_segments);
    assert_eq!((after.epoch, after.epoch_position), (0, 6 * 8), "rank 0's 6 steps x 2 ranks x batch 4");

    // The same processes come back: rank 1 through Register with its generation, rank 0 with a
    // heartbeat (it kept training meanwhile).
    let mut a = FakeWorker::connect(&coord.url, &coord.token, "a").await;
    let mut b = FakeWorker::connect(&coord.url, &coord.token, "b").await;
    let placement = b.register(1, 7).await.unwrap();
    assert!(placement.reattached);
    assert_eq!((placement.generation, placement.rank, placement.world_size), (1, 1, 2));
    assert_eq!(placement.peers[0].peer_addr, "a:1");
    a.generation = 1;
    assert_eq!(a.heartbeat(8).await.unwrap().directive, Directive::Continue as i32);
    let err = FakeWorker::connect(&coord.url, &coord.token, "a").await.register(9, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("re-attach to generation 9"), "{}", err.message());

    // Training goes on in the same generation: a new checkpoint, then both leave.
    a.report_train(8, 0, 0.1).await.unwrap();
    let name = write_checkpoint(&cfg, 8);
    let ack = a.commit(&name, 8, 0, 64, &hash).await.unwrap();
    assert_eq!(ack.pruned, ["step-5"]);
    let status = coord.status().await;
    assert_eq!(status.epoch_position, 8 * 8);
    assert_eq!(status.history.len(), before.history.len() + 1);
    assert_eq!(kinds(&status), ["formed", "coordinator_restarted", "reattached", "reattached"]);
    a.leave().await.unwrap();
    b.leave().await.unwrap();
    let report = coord.report().await;
    assert_eq!(report.outcome, JobOutcome::Finished);

    // A third start finds the job finished and serves nothing.
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    assert_eq!(coord.report().await.outcome, JobOutcome::Finished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_workers_form_a_new_generation_from_the_newest_checkpoint() {
    let cfg = config();
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    train(&coord, &cfg, 7, &[5]).await;
    coord.kill().await;

    // Coordinator and workers all restarted: the workers lost their state and register anew.
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let mut a = FakeWorker::connect(&coord.url, &coord.token, "a").await;
    let mut b = FakeWorker::connect(&coord.url, &coord.token, "b").await;
    let (pa, pb) = tokio::join!(a.register(0, 0), b.register(0, 0));
    let (pa, pb) = (pa.unwrap(), pb.unwrap());
    assert_eq!((pa.generation, pb.generation), (2, 2));
    let resume = pa.resume.expect("the newest committed checkpoint");
    assert_eq!(
        (resume.step, resume.epoch, resume.epoch_position, resume.path.as_str()),
        (5, 0, 40, "step-5")
    );
    assert_eq!(pb.resume.unwrap().step, 5);

    // The epoch continues at the checkpoint: 160 samples left for 2 x 4, no sample twice.
    let sa = a.train_shard(0, SAMPLES, 5, Some(40)).await.unwrap();
    let sb = b.train_shard(0, SAMPLES, 5, None).await.unwrap();
    assert_eq!((sa.epoch_position, sb.epoch_position, sa.steps), (40, 40, 20));
    let perm = mtl_job::sharding::permutation(SAMPLES, cfg.job.seed, 0);
    let mut trained: Vec<u64> = perm[..40].to_vec();
    trained.extend(sa.positions.iter().chain(&sb.positions));
    trained.sort();
    assert_eq!(trained, (0..SAMPLES).collect::<Vec<_>>(), "every sample of the epoch exactly once");

    let status = coord.status().await;
    let segments: Vec<(u64, u64, u64, u64)> =
        status.epoch_segments.iter().map(|s| (s.generation, s.start, s.end, s.kept_end)).collect();
    assert_eq!(segments, [(1, 0, 56, 40), (2, 40, 40, 40)], "generation 1's steps 6-7 rolled back");
    assert_eq!(kinds(&status), ["formed", "coordinator_restarted", "ended", "formed"]);
    let ended = &status.events[2].detail;
    assert!(ended.contains("registered afresh"), "{ended}");
    assert!(
        status.events[3].detail.contains("resumes from checkpoint step 5"),
        "{}",
        status.events[3].detail
    );
    coord.stop().await;
}
