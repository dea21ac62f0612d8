//! `worker train --standalone` on synthetic data: every task's metric improves over the
//! untrained model, and the saved model evaluates to the same numbers.
mod common;

use std::collections::BTreeMap;
use std::process::Command;

fn run_json(args: &[&str]) -> BTreeMap<String, f64> {
    let out = Command::new(common::bin("worker")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker {args:?} failed:\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN))).collect()
}

#[test]
fn standalone_training_improves_every_task_and_the_checkpoint_evaluates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"ci-train\"\nseed = 1\n[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = 256\n\
             synthetic_size = 64\nimage_size = 64\n[model]\nbackbone = \"tiny\"\n\
             [train]\nsteps = 250\nbatch_size = 16\nlr = 0.1\nwarmup_steps = 5\nlog_every_steps = 50\n",
            data.display()
        ),
    )
    .unwrap();
    let ckpt = dir.path().join("model");
    let job = job.to_str().unwrap();
    let untrained = run_json(&[
        "train",
        "--standalone",
        "--config",
        job,
        "--set",
        "train.steps=0",
        "--set",
        "train.warmup_steps=0",
        "--json",
    ]);
    let trained =
        run_json(&["train", "--standalone", "--config", job, "--out", ckpt.to_str().unwrap(), "--json"]);
    for key in ["accuracy", "F1", "AP", "AP50", "mIoU", "pixel_accuracy"] {
        assert!(
            trained[key] > untrained[key],
            "{key}: {} after training vs {} untrained",
            trained[key],
            untrained[key]
        );
    }
    let evaluated = run_json(&["eval", "--checkpoint", ckpt.to_str().unwrap(), "--json"]);
    assert_eq!(evaluated, trained);
}

#[test]
fn eval_scores_a_coco_results_file_like_pycocotools() {
    // The metrics crate's golden fixture: expected stats come from pycocotools.
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../metrics/fixtures");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("det_mixed_expected.json")).unwrap())
            .unwrap();
    let got = run_json(&[
        "eval",
        "--gt",
        fixtures.join("det_mixed_gt.json").to_str().unwrap(),
        "--detections",
        fixtures.join("det_mixed_results.json").to_str().unwrap(),
        "--json",
    ]);
    let stats = expected["stats"].as_array().unwrap();
    assert_eq!(got["AP"], stats[0].as_f64().unwrap());
    assert_eq!(got["AP50"], stats[1].as_f64().unwrap());
}
