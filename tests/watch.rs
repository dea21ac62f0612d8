//! A run watched over HTTP while it trains: two workers on loopback, the coordinator's
//! `/metrics` scraped and parsed (its values must be the ones `coordinator status` and the
//! metrics history file hold), then the dashboard loaded in a real headless Chromium, whose DOM
//! must show the workers and curves with points; a screenshot is kept under target/.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http_get, job, spawn_worker, tiny_data, InProcessCoordinator};
use serde_json::Value;

const CHROMIUM: &str = "/usr/bin/chromium";

/// One scrape: `name{labels}` (labels as exposed) -> value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: `{line}`"));
        let value = value.parse().unwrap_or_else(|_| panic!("not a number: `{line}`"));
        assert!(samples.insert(series.to_string(), value).is_none(), "`{series}` twice");
    }
    samples
}

fn metrics_history(path: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The value a JSON-lines point holds for `key` (an undefined metric is written as null).
fn json_value(point: &Value, key: &str) -> f64 {
    point["values"][key].as_f64().unwrap_or(f64::NAN)
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// Runs headless Chromium on `url` with `args`, within a deadline; returns its stdout.
fn chromium(url: &str, args: &[String]) -> String {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: run scripts/install-chromium.sh (make test does)"
    );
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            // Without these, Chromium's own connections on a closed network stall it.
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // Timers run on virtual time: the page polls, draws, and the dump waits for it.
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100)); // polling the process, not syncing
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Where test artefacts go: `target/<profile>/test-artefacts/`.
fn artefact(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap().join("test-artefacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Every `<polyline ...>` tag's attributes `data-series` -> `data-points`.
fn polylines(dom: &str) -> BTreeMap<String, usize> {
    let attr = |tag: &str, name: &str| {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[start..][..tag[start..].find('"')?].to_string())
    };
    dom.split("<polyline")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            Some((attr(tag, "data-series")?, attr(tag, "data-points")?.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_scraped_and_shown_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough never to end by itself: the test stops it once it has seen what it needs.
    let body = format!(
        "{}[rendezvous]\nmin_workers = 2\n[train]\nsteps = 100000\nbatch_size = 4\nlr = 0.02\n\
         log_every_steps = 2\neval_every_steps = 6\n[checkpoint]\nevery_steps = 6\n",
        tiny_data(&dir.path().join("data"), 64)
    );
    let cfg = job(&body);
    let metrics_file = cfg.server.metrics_file.clone();
    let (coord, http) = InProcessCoordinator::start_watched(cfg).await;
    let mut workers: Vec<_> =
        (0..2).map(|i| spawn_worker(&coord.url, &coord.token, &format!("w{i}"))).collect();

    // The page itself holds no data; the data needs the token.
    let (code, page) = http_get(&http, "/", None).await;
    assert_eq!(code, 200);
    assert!(page.contains("<script src=\"dashboard.js\">") && !page.contains("://"), "no external asset");
    assert_eq!(http_get(&http, "/metrics", None).await.0, 401);
    assert_eq!(http_get(&http, "/api/status", Some("wrong")).await.0, 401);

    // Scrape until the run has two training reports, an evaluation after the untrained one and
    // a committed checkpoint.
    let deadline = Instant::now() + Duration::from_secs(240);
    let samples = loop {
        let (code, text) = http_get(&http, "/metrics", Some(&coord.token)).await;
        assert_eq!(code, 200, "{text}");
        let samples = parse_exposition(&text);
        let count = |name: &str| samples.get(name).copied().unwrap_or(0.0);
        if count("mtl_train_reports_total") >= 2.0
            && count("mtl_evaluations_total") >= 2.0
            && samples.contains_key("mtl_checkpoint_step")
        {
            assert_eq!(text.lines().last(), Some("# EOF"));
            assert!(text.contains("# TYPE mtl_train_loss gauge\n"), "{text}");
            assert!(text.contains("# TYPE mtl_checkpoints_committed counter\n"), "{text}");
            break samples;
        }
        for (i, w) in workers.iter_mut().enumerate() {
            assert!(w.try_wait().unwrap().is_none(), "worker {i} exited early");
        }
        assert!(
            Instant::now() < deadline,
            "the run did not report, evaluate and checkpoint in time:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await; // polling the scrape, not syncing
    };
    let status = coord.status().await;
    let history = metrics_history(&metrics_file);

    // The job and its workers, as `coordinator status` has them.
    assert_eq!(status.state, "running");
    assert_eq!(samples["mtl_job_state{state=\"running\"}"], 1.0);
    assert_eq!(samples["mtl_job_state{state=\"failed\"}"], 0.0);
    assert_eq!(samples["mtl_generation"], status.generation as f64);
    assert_eq!(samples["mtl_world_size"], f64::from(status.world_size));
    let alive = status.workers.iter().filter(|w| w.state == "active").count();
    assert_eq!((samples["mtl_workers_alive"], alive), (2.0, 2));
    for w in &status.workers {
        let series = format!("mtl_worker_step{{worker=\"{}\",rank=\"{}\"}}", w.worker_id, w.rank);
        let scraped = samples.get(&series).unwrap_or_else(|| panic!("no {series}"));
        assert!(*scraped <= w.last_step as f64, "{series}: {scraped} then {}", w.last_step);
    }

    // Losses and the rate: the training report of `mtl_train_report_step` in the history file.
    let step = samples["mtl_train_report_step"];
    assert!(samples["mtl_step"] >= step);
    let report = history
        .iter()
        .find(|p| p["kind"] == "train" && p["step"].as_f64() == Some(step))
        .unwrap_or_else(|| panic!("no train point at step {step} in {metrics_file}"));
    let mut tasks = 0;
    for (key, _) in report["values"].as_object().unwrap() {
        if let Some(task) = key.strip_prefix("loss/") {
            assert!(
                same(samples[&format!("mtl_train_loss{{task=\"{task}\"}}")], json_value(report, key)),
                "{key}"
            );
            tasks += 1;
        }
    }
    assert_eq!(tasks, 3, "a loss per task: {report}");
    assert!(same(samples["mtl_images_per_second"], json_value(report, "images_per_s")));
    assert!(same(samples["mtl_learning_rate"], json_value(report, "lr")));
    let trains_up_to =
        history.iter().filter(|p| p["kind"] == "train" && p["step"].as_f64() <= Some(step)).count();
    assert_eq!(samples["mtl_train_reports_total"], trains_up_to as f64);

    // Every metric of the evaluation of `mtl_eval_step`, labelled with its task.
    let eval_step = samples["mtl_eval_step"];
    assert!(eval_step > 0.0, "an evaluation after the untrained one");
    let eval = history.iter().find(|p| p["kind"] == "eval" && p["step"].as_f64() == Some(eval_step)).unwrap();
    let metrics = eval["values"].as_object().unwrap();
    for key in metrics.keys() {
        let task = mtl_metrics::metric_task(key).unwrap_or_else(|| panic!("`{key}` belongs to no task"));
        let series = format!("mtl_eval_metric{{task=\"{task}\",metric=\"{key}\"}}");
        assert!(same(samples[&series], json_value(eval, key)), "{series}");
    }
    assert!(["accuracy", "AP50", "mIoU"].iter().all(|k| metrics.contains_key(*k)), "{eval}");
    let evals_up_to =
        history.iter().filter(|p| p["kind"] == "eval" && p["step"].as_f64() <= Some(eval_step)).count();
    assert_eq!(samples["mtl_evaluations_total"], evals_up_to as f64);

    // The checkpoints, as the status lists them.
    let checkpoint = samples["mtl_checkpoint_step"] as u64;
    assert!(
        status.checkpoints.iter().any(|c| c.step == checkpoint),
        "{checkpoint} in {:?}",
        status.checkpoints
    );
    let committed_up_to = status.checkpoints.iter().filter(|c| c.step <= checkpoint).count();
    assert_eq!(samples["mtl_checkpoints_committed_total"], committed_up_to as f64);

    // The dashboard in a real browser, during the run. The token travels in the fragment: the
    // page reads it, the server never sees it in a URL.
    let url = format!("{http}/#token={}", coord.token);
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&url, &["--dump-dom".to_string()])
    })
    .await
    .unwrap();
    for w in &status.workers {
        assert!(
            dom.contains(&format!("data-worker-id=\"{}\"", w.worker_id)),
            "worker {} not shown:\n{dom}",
            w.worker_id
        );
    }
    assert!(dom.contains("data-state=\"running\""), "{dom}");
    let lines = polylines(&dom);
    for series in ["loss/cls", "loss/det", "loss/seg", "accuracy", "AP50", "mIoU"] {
        let n = lines.get(series).copied().unwrap_or(0);
        assert!(n >= 2, "a curve of `{series}` with at least 2 points, got {n}: {lines:?}");
    }
    // The kept checkpoints when the page loaded: the run goes on meanwhile, so the scraped one
    // may have been pruned (`keep_last`) by then, but the newest listed is at least as new and
    // each is a commit step.
    let listed: Vec<u64> = dom
        .split("data-checkpoint-step=\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').unwrap()].parse().unwrap())
        .collect();
    assert!(listed.iter().max().is_some_and(|&newest| newest >= checkpoint), "{listed:?} vs {checkpoint}");
    assert!(listed.iter().all(|step| step % 6 == 0), "checkpoints every 6 steps: {listed:?}");
    assert!(dom.contains("data-metric=\"mIoU\""), "the latest evaluation's table");

    let screenshot = artefact("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    tokio::task::spawn_blocking({
        let arg = format!("--screenshot={}", screenshot.display());
        move || chromium(&url, &[arg, "--window-size=1280,900".to_string(), "--hide-scrollbars".to_string()])
    })
    .await
    .unwrap();
    let png = std::fs::read(&screenshot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a PNG with content");
    eprintln!("dashboard screenshot: {}", screenshot.display());

    for mut w in workers {
        w.kill().unwrap();
        let _ = w.wait();
    }
    coord.stop().await;
}
