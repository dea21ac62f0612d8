//! Coordinator + worker processes training the multi-task model on loopback: losses are
//! reported, every rank's evaluation statistics are merged centrally, and the merged metrics
//! equal a single process evaluating the same model on the same validation set, exactly.
mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{job, spawn_worker_with, tiny_data, wait, InProcessCoordinator};
use mtl_coordinator::JobOutcome;
use mtl_job::NormKind;
use mtl_proto::v1::MetricsKind;

async fn train_and_compare(world: usize, norm: NormKind) {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[rendezvous]\nmin_workers = {world}\n[train]\nsteps = 12\nbatch_size = 4\nlr = 0.05\nclip_grad_norm = 5.0\n\
         log_every_steps = 4\neval_every_steps = 6\n",
        tiny_data(&dir.path().join("data"), 96)
    );
    let mut cfg = job(&body);
    cfg.model.norm = norm;
    let coord = InProcessCoordinator::start(cfg).await;
    let ckpt = dir.path().join("model");
    let workers: Vec<_> = (0..world)
        .map(|i| {
            let out = ckpt.to_str().unwrap().to_string();
            spawn_worker_with(&coord.url, &coord.token, &format!("w{i}"), &["--out", &out])
        })
        .collect();
    let report = coord.report().await;
    for (i, w) in workers.into_iter().enumerate() {
        let (code, stderr) = wait(w).await;
        assert_eq!(code, Some(0), "worker {i}:\n{stderr}");
    }
    assert_eq!(report.outcome, JobOutcome::Finished);
    let history = &report.status.history;
    let train: Vec<u64> =
        history.iter().filter(|p| p.kind == MetricsKind::Train as i32).map(|p| p.step).collect();
    assert_eq!(train, [4, 8, 12], "rank 0 reports every log step");
    let evals: Vec<_> = history.iter().filter(|p| p.kind == MetricsKind::Eval as i32).collect();
    assert_eq!(
        evals.iter().map(|p| p.step).collect::<Vec<_>>(),
        [0, 6, 12],
        "one merged evaluation of the untrained model and one per eval step"
    );
    let merged: BTreeMap<String, f64> = evals[2].values.iter().map(|(k, v)| (k.clone(), *v)).collect();

    // The same model evaluated by one process over the whole validation split.
    let out = Command::new(common::bin("worker"))
        .args(["eval", "--checkpoint", ckpt.to_str().unwrap(), "--json"])
        .env("OMP_NUM_THREADS", "1") // as the workers run
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let single: BTreeMap<String, f64> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
        .collect();
    assert_eq!(single.keys().collect::<Vec<_>>(), merged.keys().collect::<Vec<_>>());
    for (k, v) in &single {
        let m = merged[k];
        assert!(
            m == *v || (m.is_nan() && v.is_nan()),
            "{world} workers, {norm:?}: {k} merged {m} vs one process {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_and_merged_eval_equals_one_process() {
    train_and_compare(2, NormKind::Group).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_train_and_merged_eval_equals_one_process() {
    train_and_compare(3, NormKind::Group).await;
}

/// With BatchNorm every rank must hold rank 0's running statistics (the saved model's) when it
/// evaluates its shard; with SyncBatchNorm the layers also reduce over the ring between processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_batch_norm_or_sync_batch_norm_evaluate_as_the_saved_model() {
    train_and_compare(2, NormKind::Batch).await;
    train_and_compare(2, NormKind::SyncBatch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluation_statistics_larger_than_grpc_default_are_accepted() {
    use mtl_proto::v1::coordinator_client::CoordinatorClient;
    use mtl_proto::v1::{MetricsReport, RegisterRequest};
    let coord = InProcessCoordinator::start(job("")).await;
    let mut client = CoordinatorClient::connect(coord.url.clone())
        .await
        .unwrap()
        .max_encoding_message_size(mtl_proto::MAX_MESSAGE_BYTES);
    let placement = client
        .register(RegisterRequest {
            job_token: coord.token.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // 1000 images with 100 detections each: about 10 MB of JSON, as a real validation shard.
    let mut det = mtl_metrics::DetectionStats::new([1u64]);
    for image in 0..1000u64 {
        let dets = (0..100)
            .map(|i| mtl_metrics::Detection {
                bbox: [i as f64, 1.5, 10.25, 20.125],
                score: 0.001 * i as f64,
                category_id: 1,
            })
            .collect();
        det.add_image(image, Vec::new(), dets).unwrap();
    }
    let stats = mtl_metrics::EvalStats { detection: Some(det), ..Default::default() };
    let json = serde_json::to_vec(&stats).unwrap();
    assert!(json.len() > 4 << 20, "the test message exceeds gRPC's default: {} bytes", json.len());
    client
        .report_metrics(MetricsReport {
            job_token: coord.token.clone(),
            worker_id: "w".into(),
            generation: placement.generation,
            rank: 0,
            kind: MetricsKind::Eval as i32,
            step: 1,
            eval_stats_json: json,
            ..Default::default()
        })
        .await
        .expect("large evaluation statistics are accepted");
    let status = coord.status().await;
    assert!(status.history.iter().any(|p| p.kind == MetricsKind::Eval as i32), "merged and recorded");
    coord.stop().await;
}
