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
             [train]\nsteps = 250\nbatch_size = 16\nlr = 0.1\nwarmup_steps = 5\nlog_every_steps = 50\n\
             [checkpoint]\ndir = \"{}\"\n",
            data.display(),
            dir.path().join("checkpoints").display()
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

#[test]
fn predict_writes_detections_classes_masks_and_overlays_in_input_coordinates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let job = dir.path().join("job.toml");
    // 64 px images through a 32 px network: outputs must come back at 64 px.
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"predict\"\n[data]\nformat = \"synthetic\"\ntrain = \"{}\"\nsynthetic_n = 40\n\
             synthetic_size = 64\nimage_size = 32\n[model]\nbackbone = \"tiny\"\n[tasks]\nscore_threshold = 0.0\n\
             [train]\nsteps = 5\nbatch_size = 8\n[checkpoint]\ndir = \"{}\"\n",
            data.display(),
            dir.path().join("checkpoints").display()
        ),
    )
    .unwrap();
    let ckpt = dir.path().join("model");
    let st = Command::new(common::bin("worker"))
        .args(["train", "--standalone", "--config", job.to_str().unwrap(), "--out", ckpt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for i in 0..3 {
        std::fs::copy(data.join(format!("images/{i:06}.png")), images.join(format!("img{i}.png"))).unwrap();
    }
    std::fs::write(images.join("broken.png"), b"not a png").unwrap();
    let out = dir.path().join("pred");
    let run = Command::new(common::bin("worker"))
        .args(["predict", "--checkpoint", ckpt.to_str().unwrap(), "--input", images.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--overlay-score", "0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("predicted 3 images (1 skipped)"), "{stdout}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("broken.png"), "the skipped file is named");

    let dets: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("detections.json")).unwrap()).unwrap();
    assert!(!dets.is_empty(), "score_threshold 0 keeps detections");
    for d in &dets {
        let b: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(
            b[0] >= 0.0 && b[1] >= 0.0 && b[0] + b[2] <= 64.0 + 1e-9 && b[1] + b[3] <= 64.0 + 1e-9,
            "{d}"
        );
        assert!(
            d["image_id"].as_u64().unwrap() < 4 && d["score"].as_f64().is_some() && d["category_id"].is_u64()
        );
    }
    let classes: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("classes.json")).unwrap()).unwrap();
    assert_eq!(classes.len(), 3);
    assert!(classes.iter().all(|c| c["class"].is_string()), "{classes:?}");
    for i in 0..3 {
        let mask = image::open(out.join(format!("masks/img{i}.png"))).unwrap();
        assert_eq!((mask.width(), mask.height()), (64, 64), "masks at the input size");
        let overlay = image::open(out.join(format!("overlays/img{i}.png"))).unwrap().to_rgb8();
        let input = image::open(images.join(format!("img{i}.png"))).unwrap().to_rgb8();
        assert_eq!(overlay.dimensions(), input.dimensions());
        assert_ne!(overlay, input, "boxes or mask were drawn");
    }
}
