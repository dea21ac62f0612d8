//! The coordinator's TensorBoard event files, read back with TensorBoard's own reader (the
//! `tensorboard` package in the project's venv, `tests/tb_read.py`): every value the
//! coordinator recorded is there under its tag at its step, the job's events are there as
//! text, a live TensorBoard sees a report while the job still runs, and the file a restarted
//! coordinator adds continues the same run.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{job, spawn_worker, tiny_data, wait, FakeWorker, InProcessCoordinator};
use mtl_coordinator::JobOutcome;

/// What TensorBoard reads from a log directory: tag -> [(step, value)] for scalars (NaN as
/// `None`) and tag -> [(step, text)] for texts.
#[derive(Debug, Default)]
struct Board {
    scalars: BTreeMap<String, Vec<(u64, Option<f64>)>>,
    texts: BTreeMap<String, Vec<(u64, String)>>,
}

fn read_board(logdir: &Path) -> Board {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = root.join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg(root.join("tests/tb_read.py"))
        .arg(logdir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", python.display()));
    assert!(
        out.status.success(),
        "TensorBoard's reader failed (scripts/setup.sh installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut board = Board::default();
    for (tag, events) in json["scalars"].as_object().unwrap() {
        let points = events.as_array().unwrap().iter().map(|e| (e[0].as_u64().unwrap(), e[1].as_f64()));
        board.scalars.insert(tag.clone(), points.collect());
    }
    for (tag, events) in json["texts"].as_object().unwrap() {
        let texts = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_str().unwrap().into()));
        board.texts.insert(tag.clone(), texts.collect());
    }
    board
}

/// A value as TensorBoard stores it (a 32-bit float), NaN as `None`.
fn as_stored(v: f64) -> Option<f64> {
    let f = v as f32;
    (!f.is_nan()).then_some(f64::from(f))
}

/// The tag the coordinator gives a value of the metrics file: training scalars keep their
/// name, evaluation metrics go under `eval/<task>/`.
fn tag(kind: &str, key: &str) -> String {
    match kind {
        "eval" => format!("eval/{}/{key}", mtl_metrics::task_of(key).expect("a metric of a task")),
        _ => key.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorboard_shows_every_recorded_value_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nmin_workers = 2\n[train]\nsteps = 8\nbatch_size = 4\nlr = 0.05\n\
         log_every_steps = 4\neval_every_steps = 4\n",
        tiny_data(&dir.path().join("data"), 64)
    );
    let cfg = job(&body);
    let logdir = cfg.server.tensorboard_path(&cfg.job.name).expect("on by default");
    assert_eq!(
        logdir,
        PathBuf::from(&cfg.server.state_db).with_file_name("tb"),
        "next to the state database"
    );
    let metrics_file = cfg.server.metrics_path(&cfg.job.name);
    let coord = InProcessCoordinator::start(cfg).await;
    let workers: Vec<_> = (0..2).map(|i| spawn_worker(&coord.url, &coord.token, &format!("w{i}"))).collect();
    let report = coord.report().await;
    for (i, w) in workers.into_iter().enumerate() {
        let (code, stderr) = wait(w).await;
        assert_eq!(code, Some(0), "worker {i}:\n{stderr}");
    }
    assert_eq!(report.outcome, JobOutcome::Finished);

    // What the coordinator recorded, from its metrics file: tag -> [(step, value)].
    let mut expected: BTreeMap<String, Vec<(u64, Option<f64>)>> = BTreeMap::new();
    let lines = std::fs::read_to_string(&metrics_file).unwrap();
    for line in lines.lines() {
        let point: serde_json::Value = serde_json::from_str(line).unwrap();
        let (kind, step) = (point["kind"].as_str().unwrap(), point["step"].as_u64().unwrap());
        for (key, v) in point["values"].as_object().unwrap() {
            // The file writes NaN (an undefined metric) as null.
            let v = v.as_f64().and_then(as_stored);
            expected.entry(tag(kind, key)).or_default().push((step, v));
        }
    }
    assert_eq!(lines.lines().count(), report.status.history.len(), "the file has every point of the history");
    for wanted in [
        "loss/cls",
        "loss/det",
        "loss/seg",
        "weight/cls",
        "lr",
        "images_per_s",
        "time/loader_wait_ms",
        "time/step_ms",
        "eval/classification/accuracy",
        "eval/detection/AP50",
        "eval/segmentation/mIoU",
    ] {
        assert!(expected.contains_key(wanted), "the job recorded no `{wanted}`: {:?}", expected.keys());
    }
    assert_eq!(expected["loss/cls"].iter().map(|p| p.0).collect::<Vec<_>>(), [4, 8]);
    assert_eq!(expected["eval/classification/accuracy"].iter().map(|p| p.0).collect::<Vec<_>>(), [0, 4, 8]);

    let board = read_board(&logdir);
    for (tag, points) in &expected {
        assert_eq!(board.scalars.get(tag), Some(points), "{tag}");
    }

    // The job's events, as `coordinator status` lists them, as text at their step.
    let events = &report.status.events;
    let texts: Vec<String> =
        events.iter().map(|e| format!("generation {} {}: {}", e.generation, e.kind, e.detail)).collect();
    let shown: Vec<&String> = board.texts["job/events"].iter().map(|(_, t)| t).collect();
    assert_eq!(shown, texts.iter().collect::<Vec<_>>());
    assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["formed", "ended"]);
    let steps: Vec<u64> = board.texts["job/events"].iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [0, 8], "formed at step 0, ended when the last step was done");
    assert_eq!(board.scalars["job/generation"], [(0, Some(1.0))]);
    assert_eq!(board.scalars["job/world_size"], [(0, Some(2.0))]);
    let extra: Vec<&String> =
        board.scalars.keys().filter(|t| !expected.contains_key(*t) && !t.starts_with("job/")).collect();
    assert!(extra.is_empty(), "tags the coordinator did not record: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_reaches_tensorboard_while_the_job_runs_and_off_writes_nothing() {
    let mut cfg = job("[rendezvous]\nmin_workers = 1\n[train]\nsteps = 100\n");
    let logdir = cfg.server.tensorboard_path(&cfg.job.name).unwrap();
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let mut worker = FakeWorker::connect(&coord.url, &coord.token, "w0").await;
    worker.register(0, 0).await.unwrap();
    worker.report_train(3, 0, 2.5).await.unwrap();
    // The job runs on (the worker has not left): the report must be readable now.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let board = if logdir.exists() { read_board(&logdir) } else { Board::default() };
        if let Some(loss) = board.scalars.get("loss/cls") {
            assert_eq!(loss, &[(3, Some(2.5))]);
            break;
        }
        assert!(Instant::now() < deadline, "the report did not reach {} while the job ran", logdir.display());
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the files, not syncing
    }
    assert_eq!(coord.status().await.state, "running");
    worker.leave().await.unwrap();
    assert_eq!(coord.report().await.outcome, JobOutcome::Finished);

    // `off`: the same job writes no event file.
    let dir = PathBuf::from(&cfg.server.state_db).parent().unwrap().join("other");
    cfg.server.state_db = dir.join("state.db").display().to_string();
    cfg.server.metrics_file = dir.join("metrics.jsonl").display().to_string();
    cfg.server.tensorboard_dir = "off".into();
    let coord = InProcessCoordinator::start(cfg).await;
    let mut worker = FakeWorker::connect(&coord.url, &coord.token, "w0").await;
    worker.register(0, 0).await.unwrap();
    worker.report_train(3, 0, 2.5).await.unwrap();
    worker.leave().await.unwrap();
    assert_eq!(coord.report().await.outcome, JobOutcome::Finished);
    assert!(dir.join("state.db").exists());
    assert!(!dir.join("tb").exists(), "tensorboard_dir = \"off\" writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_adds_a_file_and_tensorboard_reads_both_as_one_run() {
    let cfg = job("[rendezvous]\nmin_workers = 1\n[train]\nsteps = 100\n");
    let logdir = cfg.server.tensorboard_path(&cfg.job.name).unwrap();
    let coord = InProcessCoordinator::start(cfg.clone()).await;
    let mut worker = FakeWorker::connect(&coord.url, &coord.token, "w0").await;
    worker.register(0, 0).await.unwrap();
    worker.heartbeat(3).await.unwrap();
    worker.report_train(3, 0, 0.5).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read_board(&logdir).scalars.contains_key("loss/cls") {
        assert!(Instant::now() < deadline, "the report did not reach {}", logdir.display());
        tokio::time::sleep(Duration::from_millis(100)).await; // polling the files, not syncing
    }
    coord.kill().await;

    // The same worker re-attaches to the restarted coordinator and trains on.
    let coord = InProcessCoordinator::start(cfg).await;
    let mut worker = FakeWorker::connect(&coord.url, &coord.token, "w0").await;
    assert!(worker.register(1, 3).await.unwrap().reattached);
    worker.report_train(6, 0, 0.25).await.unwrap();
    worker.leave().await.unwrap();
    let report = coord.report().await;
    assert_eq!(report.outcome, JobOutcome::Finished);

    let files = std::fs::read_dir(&logdir).unwrap().count();
    assert_eq!(files, 2, "one event file per coordinator start");
    let board = read_board(&logdir);
    assert_eq!(board.scalars["loss/cls"], [(3, Some(0.5)), (6, Some(0.25))]);
    let texts: Vec<String> = report
        .status
        .events
        .iter()
        .map(|e| format!("generation {} {}: {}", e.generation, e.kind, e.detail))
        .collect();
    let shown: Vec<String> = board.texts["job/events"].iter().map(|(_, t)| t.clone()).collect();
    assert_eq!(shown, texts);
    let kinds: Vec<&str> = report.status.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["formed", "coordinator_restarted", "reattached", "ended"]);
}
