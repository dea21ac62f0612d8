//! Stopping on request with real processes on loopback: SIGTERM (what Slurm's `scancel` and
//! preemption and a deleted Kubernetes pod send) to every process of a running job, or to the
//! coordinator alone, ends in a committed checkpoint of the step every rank stopped at, the
//! documented exit statuses (75: stopped, resumable), the job recorded as interrupted; served
//! again, it resumes from that checkpoint and ends bit-identical to an uninterrupted run.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::{
    bound_address, job, poll_until, same_tensors, spawn_coordinator, spawn_worker, tiny_data, wait,
    InProcessCoordinator,
};
use mtl_coordinator::{JobConfig, JobOutcome, EXIT_STOPPED};
use mtl_proto::v1::JobStatus;

/// One test at a time: each runs several training processes on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Steps enough that a stop requested after step 3 comes well before the end.
const STEPS: u64 = 60;

/// Two workers, batch 4, no periodic checkpoint: the only ones are the stop's and the final.
fn config(data: &Path) -> JobConfig {
    job(&format!(
        "{}[rendezvous]\nmin_workers = 2\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 20000\n\
         coordinator_grace_ms = 60000\n[train]\nsteps = {STEPS}\nbatch_size = 4\nlr = 0.05\nclip_grad_norm = 5.0\n\
         log_every_steps = 1\n[checkpoint]\nkeep_last = 100\n",
        tiny_data(data, 64)
    ))
}

fn checkpoint_dir(cfg: &JobConfig) -> PathBuf {
    cfg.checkpoint.dir_path(&cfg.job.name)
}

fn sigterm(pid: u32) {
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -TERM {pid}");
}

/// A coordinator process and two workers, once both workers have completed step 3.
async fn start_job(cfg: &JobConfig, dir: &Path) -> (Child, Vec<Child>, JobStatus) {
    let (coordinator, addr_file) = spawn_coordinator(cfg, dir, "127.0.0.1:0");
    let url = format!("http://{}", bound_address(&addr_file));
    let token = cfg.job.token.expose();
    let workers: Vec<Child> = (0..2).map(|i| spawn_worker(&url, token, &format!("w{i}"))).collect();
    let status =
        poll_until(&url, token, |s| s.workers.len() == 2 && s.workers.iter().all(|w| w.last_step >= 3)).await;
    (coordinator, workers, status)
}

/// Waits for every process: (exit code, stderr) each, the coordinator first.
async fn exits(coordinator: Child, workers: Vec<Child>) -> Vec<(Option<i32>, String)> {
    let mut out = vec![wait(coordinator).await];
    for w in workers {
        out.push(wait(w).await);
    }
    out
}

/// The step every worker says it stopped after; asserts they agree.
fn stop_step(logs: &[(Option<i32>, String)]) -> u64 {
    let steps: Vec<u64> = logs[1..]
        .iter()
        .map(|(_, log)| {
            let line = log
                .lines()
                .find(|l| l.contains("stopping on request after this step"))
                .unwrap_or_else(|| {
                    panic!("a worker did not stop on request:\n{log}");
                });
            let at = line.find("step=").expect("step field") + "step=".len();
            line[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(steps.windows(2).all(|p| p[0] == p[1]), "every rank stops after the same step: {steps:?}");
    steps[0]
}

/// The job's state as a coordinator served on it again reads it from the state database.
async fn stored_status(cfg: &JobConfig) -> JobStatus {
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let status = coord.status().await;
    coord.stop().await;
    status
}

fn assert_stopped_with_checkpoint(
    cfg: &JobConfig,
    logs: &[(Option<i32>, String)],
    status: &JobStatus,
) -> u64 {
    let all = || logs.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n---\n");
    for (code, _) in logs {
        assert_eq!(*code, Some(i32::from(EXIT_STOPPED)), "every process exits 75 (stopped):\n{}", all());
    }
    let step = stop_step(logs);
    assert!((3..STEPS).contains(&step), "stopped at {step}");
    let steps: Vec<u64> = status.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [step], "the checkpoint of the stop step is committed");
    assert!(checkpoint_dir(cfg).join(format!("step-{step}")).join("manifest.json").is_file());
    let ended = status.events.iter().rev().find(|e| e.kind == "ended").expect("the generation ended");
    assert!(ended.detail.contains(&format!("stopped on request at step {step}")), "{}", ended.detail);
    assert_ne!(status.state, "finished");
    assert_ne!(status.state, "failed");
    step
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_every_process_ends_in_a_checkpoint_and_the_job_resumes_bit_identical() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let whole = config(&data);
    let coord = InProcessCoordinator::start(whole.clone()).await;
    let workers: Vec<Child> =
        (0..2).map(|i| spawn_worker(&coord.url, &coord.token, &format!("w{i}"))).collect();
    assert_eq!(coord.report().await.outcome, JobOutcome::Finished);
    for w in workers {
        let (code, log) = wait(w).await;
        assert_eq!(code, Some(0), "{log}");
    }

    let cfg = config(&data);
    let (coordinator, workers, _) = start_job(&cfg, dir.path()).await;
    for pid in std::iter::once(coordinator.id()).chain(workers.iter().map(Child::id)) {
        sigterm(pid);
    }
    let logs = exits(coordinator, workers).await;
    let status = stored_status(&cfg).await;
    let step = assert_stopped_with_checkpoint(&cfg, &logs, &status);
    assert!(status.events.iter().any(|e| e.kind == "stop_requested"), "{:?}", status.events);

    // Served again with two fresh workers: it resumes from the stop's checkpoint.
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let workers: Vec<Child> =
        (0..2).map(|i| spawn_worker(&coord.url, &coord.token, &format!("w{i}"))).collect();
    let report = coord.report().await;
    for w in workers {
        let (code, log) = wait(w).await;
        assert_eq!(code, Some(0), "{log}");
        assert!(log.contains("resumed"), "{log}");
    }
    assert_eq!(report.outcome, JobOutcome::Finished);
    assert_eq!(report.status.resume.expect("resumed").step, step);
    let last = format!("step-{STEPS}");
    same_tensors(&checkpoint_dir(&whole).join(&last), &checkpoint_dir(&cfg).join(&last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_coordinator_alone_ends_in_a_committed_checkpoint() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&dir.path().join("data"));
    let (coordinator, workers, _) = start_job(&cfg, dir.path()).await;
    sigterm(coordinator.id());
    let logs = exits(coordinator, workers).await;
    let status = stored_status(&cfg).await;
    assert_stopped_with_checkpoint(&cfg, &logs, &status);
    assert!(
        logs[1..].iter().all(|(_, l)| l.contains("coordinator asks to stop")),
        "the workers heard it in their heartbeats: {logs:?}"
    );
}

/// A coordinator served in-process whose stop (`stop_tx`) and immediate shutdown (`now_tx`)
/// the test triggers, with one simulated worker registered in its generation.
async fn stoppable(
    stop_timeout_ms: u64,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<mtl_coordinator::JobReport, mtl_coordinator::CoordinatorError>>,
    common::FakeWorker,
) {
    let mut cfg = job("[rendezvous]\nmin_workers = 1\nheartbeat_timeout_ms = 60000\n");
    cfg.server.stop_timeout_ms = stop_timeout_ms;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (now_tx, now_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(mtl_coordinator::run_with_stop(
        cfg,
        listener,
        async move {
            let _ = stop_rx.await;
            "test"
        },
        async move {
            let _ = now_rx.await;
        },
    ));
    let mut w = common::FakeWorker::connect(&url, "t0k", "w0").await;
    w.register(0, 0).await.unwrap();
    assert_eq!(w.heartbeat(1).await.unwrap().directive, mtl_proto::v1::Directive::Continue as i32);
    (stop_tx, now_tx, handle, w)
}

/// Heartbeats until the coordinator says `DIRECTIVE_INTERRUPT`.
async fn until_interrupt(w: &mut common::FakeWorker) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.heartbeat(1).await.unwrap().directive != mtl_proto::v1::Directive::Interrupt as i32 {
        assert!(std::time::Instant::now() < deadline, "no DIRECTIVE_INTERRUPT");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await; // polling the answer, not syncing
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_stopped_once_the_workers_left_and_interrupted_when_they_do_not_in_time() {
    // The worker leaves interrupted: the job is stopped, resumable.
    let (stop_tx, _now_tx, handle, mut w) = stoppable(60_000).await;
    stop_tx.send(()).unwrap();
    until_interrupt(&mut w).await;
    let leave = mtl_proto::v1::LeaveRequest {
        job_token: w.token.clone(),
        worker_id: w.worker_id.clone(),
        generation: w.generation,
        interrupted: true,
        step: 1,
        ..Default::default()
    };
    w.client.leave(leave).await.unwrap();
    let report = handle.await.unwrap().unwrap();
    assert_eq!(report.outcome, JobOutcome::Stopped { checkpoint_step: None });
    assert_eq!(report.status.state, "interrupted");

    // It never leaves: the coordinator stops after server.stop_timeout_ms, interrupted.
    let (stop_tx, _now_tx, handle, mut w) = stoppable(300).await;
    stop_tx.send(()).unwrap();
    until_interrupt(&mut w).await;
    assert_eq!(handle.await.unwrap().unwrap().outcome, JobOutcome::Interrupted);

    // A second signal during the wait stops it at once.
    let (stop_tx, now_tx, handle, mut w) = stoppable(600_000).await;
    stop_tx.send(()).unwrap();
    until_interrupt(&mut w).await;
    now_tx.send(()).unwrap();
    assert_eq!(handle.await.unwrap().unwrap().outcome, JobOutcome::Interrupted);
}
