//! Durable distributed runs with real worker processes on loopback: rank 0 writes and commits
//! checkpoints; a job whose processes are all killed resumes exactly (bit-identical to an
//! uninterrupted run) or with fewer workers (the rest of the epoch re-sharded, every sample
//! once); a coordinator killed with SIGKILL and restarted loses no step, metric point or
//! checkpoint while the workers train on.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{
    bound_address, job, poll_until, same_tensors, spawn_coordinator, spawn_worker, tiny_data, wait,
    InProcessCoordinator,
};
use mtl_coordinator::{JobConfig, JobOutcome};
use mtl_proto::v1::{JobStatus, MetricsKind};

/// One test at a time: each runs several training processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A job of `world` workers, `steps` steps at batch 4, every step reported, a checkpoint every
/// `every` steps (all kept).
fn config(data: &Path, samples: u32, world: u32, steps: u64, every: u64) -> JobConfig {
    job(&format!(
        "{}[rendezvous]\nmin_workers = {world}\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 20000\n\
         coordinator_grace_ms = 60000\n[train]\nsteps = {steps}\nbatch_size = 4\nlr = 0.05\nclip_grad_norm = 5.0\n\
         log_every_steps = 1\n[checkpoint]\nevery_steps = {every}\nkeep_last = 100\n",
        tiny_data(data, samples)
    ))
}

fn checkpoint_dir(cfg: &JobConfig) -> PathBuf {
    cfg.checkpoint.dir_path(&cfg.job.name)
}

fn spawn_workers(url: &str, token: &str, world: usize) -> Vec<Child> {
    (0..world).map(|i| spawn_worker(url, token, &format!("w{i}"))).collect()
}

/// SIGKILLs every worker.
fn kill_all(workers: Vec<Child>) {
    for mut w in workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
}

/// SIGKILLs the processes `pids` (workers whose output is still wanted).
fn kill_pids(pids: Vec<u32>) {
    for pid in pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
}

/// Every worker's stderr once it exited.
async fn all_logs(workers: Vec<Child>) -> Vec<String> {
    let mut logs = Vec::new();
    for w in workers {
        logs.push(wait(w).await.1);
    }
    logs
}

async fn all_succeed(workers: Vec<Child>) -> Vec<String> {
    let mut logs = Vec::new();
    for (i, w) in workers.into_iter().enumerate() {
        let (code, stderr) = wait(w).await;
        assert_eq!(code, Some(0), "worker {i}:\n{stderr}");
        logs.push(stderr);
    }
    logs
}

/// Runs the whole job with `world` fresh workers against an in-process coordinator.
async fn run_to_end(cfg: &JobConfig, world: usize) -> (JobStatus, Vec<String>) {
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let workers = spawn_workers(&coord.url, &coord.token, world);
    let report = coord.report().await;
    let logs = all_succeed(workers).await;
    assert_eq!(report.outcome, JobOutcome::Finished, "{logs:?}");
    (report.status, logs)
}

/// Starts the job with `world` workers and SIGKILLs the coordinator and every worker once
/// `commits` checkpoints are committed; returns the status then.
async fn run_and_kill_after(cfg: &JobConfig, world: usize, commits: usize) -> JobStatus {
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let workers = spawn_workers(&coord.url, &coord.token, world);
    let status = poll_until(&coord.url, &coord.token, |s| s.checkpoints.len() >= commits).await;
    kill_all(workers);
    coord.kill().await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_killed_after_a_checkpoint_resume_bit_identical() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 64 images, 51 for training: 6 steps an epoch for 2 x 4, so 8 steps cross an epoch.
    let whole = config(&data, 64, 2, 8, 2);
    let (status, _) = run_to_end(&whole, 2).await;
    let steps: Vec<u64> = status.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [2, 4, 6, 8], "rank 0 commits every checkpoint.every_steps and at the end");
    assert!(checkpoint_dir(&whole).join("step-8").join("manifest.json").is_file());

    let cfg = config(&data, 64, 2, 8, 2);
    let before = run_and_kill_after(&cfg, 2, 1).await;
    let (status, logs) = run_to_end(&cfg, 2).await;
    let resume = status.resume.expect("the second generation resumed from a checkpoint");
    assert!(resume.step >= before.checkpoints[0].step && resume.step < 8, "{resume:?}");
    assert_eq!(status.generation, 2);
    assert!(logs.iter().all(|l| l.contains("resumed")), "every rank loads the checkpoint");
    same_tensors(&checkpoint_dir(&whole).join("step-8"), &checkpoint_dir(&cfg).join("step-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumes_bit_identical() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let whole = config(&data, 64, 2, 8, 2);
    run_to_end(&whole, 2).await;

    let cfg = config(&data, 64, 2, 8, 2);
    let before = run_and_kill_after(&cfg, 2, 2).await;
    // Every checkpoint after the first committed one gets one byte flipped (whichever of them
    // the coordinator recorded last before the kill, it is corrupt now).
    let first = before.checkpoints[0].step;
    let ckpts = checkpoint_dir(&cfg);
    let mut flipped = Vec::new();
    for entry in std::fs::read_dir(&ckpts).unwrap() {
        let path = entry.unwrap().path();
        let step =
            path.file_name().unwrap().to_str().unwrap().strip_prefix("step-").and_then(|n| n.parse().ok());
        if step.is_some_and(|s: u64| s > first) && path.join("manifest.json").is_file() {
            let file = path.join("model.safetensors");
            let mut bytes = std::fs::read(&file).unwrap();
            let at = bytes.len() - 1;
            bytes[at] ^= 0x01;
            std::fs::write(&file, bytes).unwrap();
            flipped.push(path);
        }
    }
    let (status, logs) = run_to_end(&cfg, 2).await;
    let resume = status.resume.expect("resumed from a committed checkpoint");
    if resume.step > first {
        for log in &logs {
            assert!(log.contains("the committed checkpoint is unusable"), "{log}");
            assert!(
                log.contains(&format!("step-{}", resume.step)) && log.contains("model.safetensors"),
                "{log}"
            );
        }
    }
    assert!(
        logs.iter()
            .all(|l| l
                .contains(&format!("resumed checkpoint={}", ckpts.join(format!("step-{first}")).display()))),
        "every rank resumes from step {first}, the newest intact one (flipped: {flipped:?}): {logs:?}"
    );
    same_tensors(&checkpoint_dir(&whole).join("step-8"), &ckpts.join("step-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_stopped_two_resume_and_every_sample_of_the_epoch_is_trained_once() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 120 images, 96 for training: 8 steps an epoch for 3 x 4; a checkpoint every 2 steps.
    // Resumed at step S < 8 by 2 x 4, the epoch ends by step S + (96 - 12 S) / 8 <= 11.
    let mut cfg = config(&dir.path().join("data"), 120, 3, 11, 2);
    let before = run_and_kill_after(&cfg, 3, 1).await;
    let resumed_at = before.checkpoints[0].epoch_position;
    // The rendezvous section is not part of the job's hash: the job continues with 2.
    cfg.rendezvous.min_workers = 2;
    let (status, _) = run_to_end(&cfg, 2).await;
    let resume = status.resume.clone().expect("resumed");
    assert_eq!(resume.epoch, 0, "killed in the middle of epoch 0");
    assert!(resume.epoch_position >= resumed_at && resume.epoch_position > 0);

    let mut epoch0: Vec<_> = status.epoch_segments.iter().filter(|s| s.epoch == 0).collect();
    epoch0.sort_by_key(|s| s.start);
    assert!(
        epoch0.iter().any(|s| s.world_size == 3) && epoch0.iter().any(|s| s.world_size == 2),
        "{epoch0:?}"
    );
    // The kept parts tile the epoch: each segment starts where the kept part of the previous
    // one ends, and the last one reaches the epoch's end (but for a tail shorter than a
    // global batch of 2 x 4, which no rank trains).
    assert_eq!(epoch0[0].start, 0);
    for pair in epoch0.windows(2) {
        assert_eq!(pair[1].start, pair[0].kept_end, "{epoch0:?}");
    }
    let last = epoch0.last().unwrap();
    assert_eq!(last.generation, 2);
    assert_eq!(last.kept_end, last.end);
    assert!(last.samples - last.end < 8, "the epoch is finished: {epoch0:?}");
    let trained: u64 = epoch0.iter().map(|s| s.kept_end - s.start).sum();
    assert_eq!(trained, last.end, "every sample of the epoch exactly once: {epoch0:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_epoch_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 76 training images: 9 steps an epoch for 2 x 4.
    let cfg = config(&dir.path().join("data"), 96, 2, 12, 3);
    let (mut coordinator, addr_file) = spawn_coordinator(&cfg, dir.path(), "127.0.0.1:0");
    let addr = bound_address(&addr_file);
    let url = format!("http://{addr}");
    let workers = spawn_workers(&url, cfg.job.token.expose(), 2);
    let before =
        poll_until(&url, cfg.job.token.expose(), |s| !s.checkpoints.is_empty() && s.epoch_position > 0).await;
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    // The workers train on without it: rank 0 writes the checkpoint after the next one it
    // may have committed meanwhile (its commit then waits for the coordinator).
    let newest = before.checkpoints.iter().map(|c| c.step).max().unwrap();
    let written_while_down = checkpoint_dir(&cfg).join(format!("step-{}", (newest + 6).min(12)));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !written_while_down.join("manifest.json").is_file() {
        if Instant::now() > deadline {
            kill_pids(workers.iter().map(|w| w.id()).collect());
            let logs = all_logs(workers).await;
            panic!("{} was never written:\n{}", written_while_down.display(), logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the disk, not syncing
    }

    // Back on the same address; the workers re-attach with `Register{generation}`.
    let (coordinator, _) = spawn_coordinator(&cfg, dir.path(), &addr);
    let out = tokio::task::spawn_blocking(move || coordinator.wait_with_output().unwrap()).await.unwrap();
    let logs = all_succeed(workers).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(logs.iter().all(|l| l.contains("re-attached")), "{logs:?}");

    // A later start reads the finished job from the state database.
    let report = InProcessCoordinator::start(cfg.clone()).await.report().await;
    assert_eq!(report.outcome, JobOutcome::Finished);
    let status = report.status;
    let kinds: Vec<&str> = status.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "formed").count(),
        1,
        "the same generation all along: {kinds:?}"
    );
    assert!(kinds.contains(&"coordinator_restarted"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "reattached").count(),
        2,
        "both workers re-attached: {kinds:?}"
    );
    let train: Vec<u64> =
        status.history.iter().filter(|p| p.kind == MetricsKind::Train as i32).map(|p| p.step).collect();
    assert_eq!(train, (1..=12).collect::<Vec<_>>(), "every step's metric point, once");
    for point in &before.history {
        assert!(status.history.contains(point), "{point:?} was lost");
    }
    let steps: Vec<u64> = status.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, (1..=4).map(|i| i * 3).collect::<Vec<_>>(), "every checkpoint committed");
    for c in &before.checkpoints {
        assert!(status.checkpoints.iter().any(|d| d.step == c.step && d.path == c.path), "{c:?} was lost");
    }
}
