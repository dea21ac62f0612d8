//! On a COCO dataset, the detection statistics of `worker eval --checkpoint` are exactly those
//! of `worker predict` followed by `worker eval --gt --detections` (pycocotools' numbers on
//! predict's output): boxes in the original images' coordinates, COCO `area` for the size
//! ranges, crowd regions, the file's image and category ids.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use image::imageops::FilterType;
use serde_json::{json, Value};

fn run_json(args: &[&str]) -> BTreeMap<String, f64> {
    let out = Command::new(common::bin("worker")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "worker {args:?} failed:\n{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN))).collect()
}

fn run(args: &[&str]) {
    let out = Command::new(common::bin("worker")).args(args).output().unwrap();
    assert!(out.status.success(), "worker {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Image sizes, cycled: landscape, portrait, square and small, so the letterbox pads either
/// side and objects fall in all three COCO size ranges.
const SIZES: [(u32, u32); 4] = [(384, 256), (256, 384), (320, 320), (160, 112)];

/// A COCO instances file for one split of the synthetic shapes data (64 px images, JSONL):
/// each image upscaled to a size of [`SIZES`] (written to `out/images`), its boxes scaled with
/// it, each object's segmentation the diamond inscribed in its box (so `area`, the diamond's,
/// is half the box area), every fifth object a crowd; image ids 1000 + 7i, category ids 10 + 3c.
fn to_coco(manifest: &Path, names: &[String], out: &Path, first: usize) -> usize {
    let text = std::fs::read_to_string(manifest).unwrap();
    let (mut images, mut annotations) = (Vec::new(), Vec::new());
    std::fs::create_dir_all(out.join("images")).unwrap();
    for (line, row) in text.lines().enumerate() {
        let row: Value = serde_json::from_str(row).unwrap();
        let index = first + line;
        let (w, h) = SIZES[index % SIZES.len()];
        let src = image::open(manifest.parent().unwrap().join(row["file"].as_str().unwrap())).unwrap();
        let file = format!("images/{index:04}.png");
        image::imageops::resize(&src.to_rgb8(), w, h, FilterType::Triangle).save(out.join(&file)).unwrap();
        let id = 1000 + 7 * index as u64;
        images.push(json!({"id": id, "file_name": file, "width": w, "height": h}));
        let (sx, sy) = (f64::from(w) / 64.0, f64::from(h) / 64.0);
        for b in row["boxes"].as_array().unwrap() {
            let v: Vec<f64> = b.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let (x, y, bw, bh) = (v[0] * sx, v[1] * sy, v[2] * sx, v[3] * sy);
            let n = annotations.len() as u64;
            annotations.push(json!({
                "id": n + 1,
                "image_id": id,
                "category_id": 10 + 3 * v[4] as u64,
                "bbox": [x, y, bw, bh],
                "area": bw * bh / 2.0,
                "iscrowd": u8::from(n % 5 == 4),
                "segmentation": [[x + bw / 2.0, y, x + bw, y + bh / 2.0, x + bw / 2.0, y + bh, x, y + bh / 2.0]],
            }));
        }
    }
    let categories: Vec<Value> =
        names.iter().enumerate().map(|(c, name)| json!({"id": 10 + 3 * c, "name": name})).collect();
    let doc = json!({"images": images, "annotations": annotations, "categories": categories});
    let name = manifest.file_stem().unwrap().to_str().unwrap();
    std::fs::write(out.join(format!("{name}.json")), doc.to_string()).unwrap();
    text.lines().count()
}

#[test]
fn checkpoint_evaluation_equals_pycocotools_on_predict_output() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = dir.path().join("shapes");
    let shapes_arg = shapes.to_str().unwrap();
    run(&["gen-data", "shapes", "--out", shapes_arg, "--n", "120", "--size", "64", "--seed", "4"]);
    let info: Value =
        serde_json::from_str(&std::fs::read_to_string(shapes.join("dataset.json")).unwrap()).unwrap();
    let names: Vec<String> = serde_json::from_value(info["det_categories"].clone()).unwrap();
    let coco = dir.path().join("coco");
    let n_train = to_coco(&shapes.join("train.jsonl"), &names, &coco, 0);
    to_coco(&shapes.join("val.jsonl"), &names, &coco, n_train);

    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"coco-eval\"\nseed = 1\n[data]\nformat = \"coco\"\ntrain = \"{}\"\nval = \"{}\"\n\
             image_size = 64\n[model]\nbackbone = \"tiny\"\n\
             [train]\nsteps = 120\nbatch_size = 16\nlr = 0.1\nwarmup_steps = 5\nlog_every_steps = 50\n\
             [checkpoint]\ndir = \"{}\"\n",
            coco.join("train.json").display(),
            coco.join("val.json").display(),
            dir.path().join("checkpoints").display()
        ),
    )
    .unwrap();
    let ckpt = dir.path().join("model");
    let ckpt_arg = ckpt.to_str().unwrap();
    run(&["train", "--standalone", "--config", job.to_str().unwrap(), "--out", ckpt_arg]);

    let in_training = run_json(&["eval", "--checkpoint", ckpt_arg, "--json"]);
    let val = coco.join("val.json");
    let pred = dir.path().join("pred");
    // The same batches as the evaluation loader (train.batch_size, ids in order), so the
    // forward passes are the same computations.
    run(&[
        "predict",
        "--checkpoint",
        ckpt_arg,
        "--input",
        val.to_str().unwrap(),
        "--out",
        pred.to_str().unwrap(),
        "--batch-size",
        "16",
    ]);
    let detections = pred.join("detections.json");
    let scored = run_json(&[
        "eval",
        "--gt",
        val.to_str().unwrap(),
        "--detections",
        detections.to_str().unwrap(),
        "--json",
    ]);

    let keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];
    for key in keys {
        let (a, b) = (in_training[key], scored[key]);
        assert!(a.to_bits() == b.to_bits(), "{key}: eval --checkpoint {a} vs predict + eval --gt {b}");
    }
    // Not vacuous: the model finds objects, and every size range has ground truth.
    assert!(scored["AP50"] > 0.0, "{scored:?}");
    for key in ["APs", "APm", "APl"] {
        assert!(scored[key] >= 0.0, "{key} is defined: {scored:?}");
    }
    // detections.json carries the file's image ids and category ids.
    let dets: Vec<Value> = serde_json::from_slice(&std::fs::read(&detections).unwrap()).unwrap();
    assert!(dets.iter().all(|d| {
        let (image, category) = (d["image_id"].as_u64().unwrap(), d["category_id"].as_u64().unwrap());
        image >= 1000 + 7 * n_train as u64
            && (image - 1000) % 7 == 0
            && category >= 10
            && (category - 10) % 3 == 0
    }));
}
