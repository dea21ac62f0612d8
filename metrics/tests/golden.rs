//! Golden values produced by the reference tools (see `fixtures/gen_fixtures.py`):
//! pycocotools' COCOeval, scikit-learn and numpy. Compared bit for bit, both for
//! a single process and for the same data split across shards merged in various
//! orders through the JSON wire format.

mod common;

use common::{assert_bits, fixture, read_fixture, split_detection, wire, Rng};
use mtl_metrics::coco::load_detection_stats;
use mtl_metrics::{
    ClassificationStats, DetectionMetrics, DetectionStats, MultiLabelStats, SegmentationStats,
};
use serde_json::Value;

fn f(v: &Value) -> f64 {
    v.as_f64().expect("number")
}

fn check_detection(metrics: &DetectionMetrics, expected: &Value, name: &str) {
    const NAMES: [&str; 12] =
        ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"];
    let stats = expected["stats"].as_array().unwrap();
    for (i, (got, want)) in metrics.stats().iter().zip(stats).enumerate() {
        assert_bits(*got, f(want), &format!("{name} {}", NAMES[i]));
    }
    let per_cat = expected["per_category_ap"].as_object().unwrap();
    assert_eq!(metrics.per_category_ap.len(), per_cat.len());
    for (cat, want) in per_cat {
        let got = metrics.per_category_ap[&cat.parse::<u64>().unwrap()];
        assert_bits(got, f(want), &format!("{name} AP of category {cat}"));
    }
}

fn load_det(name: &str) -> (DetectionStats, Value) {
    let stats = load_detection_stats(
        fixture(&format!("det_{name}_gt.json")),
        fixture(&format!("det_{name}_results.json")),
    )
    .unwrap();
    (stats, read_fixture(&format!("det_{name}_expected.json")))
}

#[test]
fn detection_matches_pycocotools() {
    for name in ["mixed", "crowded"] {
        let (stats, expected) = load_det(name);
        check_detection(&stats.finish(), &expected, name);
    }
}

#[test]
fn detection_sharded_merge_matches_pycocotools_in_any_order() {
    for name in ["mixed", "crowded"] {
        let (stats, expected) = load_det(name);
        let mut rng = Rng::new(17);
        for (shards, round) in [(2, 0), (3, 1), (5, 2), (20, 3)] {
            let mut parts = split_detection(&stats, shards, |_| rng.below(shards));
            if round % 2 == 1 {
                parts.reverse();
            }
            // Tree-shaped merge for even rounds, left fold otherwise.
            let merged = if round % 2 == 0 {
                let mut level: Vec<DetectionStats> = parts.iter().map(wire).collect();
                while level.len() > 1 {
                    let mut next = Vec::new();
                    for pair in level.chunks(2) {
                        let mut a = pair[0].clone();
                        if let Some(b) = pair.get(1) {
                            a.merge(&wire(b)).unwrap();
                        }
                        next.push(a);
                    }
                    level = next;
                }
                level.pop().unwrap()
            } else {
                let mut acc = DetectionStats::new(stats.category_ids().iter().copied());
                for p in &parts {
                    acc.merge(&wire(p)).unwrap();
                }
                acc
            };
            assert_eq!(merged, stats, "{name}: merge of {shards} shards is the union");
            check_detection(&wire(&merged).finish(), &expected, &format!("{name} / {shards} shards"));
        }
    }
}

#[test]
fn classification_matches_sklearn() {
    let fx = read_fixture("classification.json");
    let num_classes = fx["num_classes"].as_u64().unwrap() as usize;
    let preds: Vec<usize> =
        fx["pred"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let targets: Vec<usize> =
        fx["target"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let mut single = ClassificationStats::new(num_classes).unwrap();
    let mut shards: Vec<ClassificationStats> =
        (0..3).map(|_| ClassificationStats::new(num_classes).unwrap()).collect();
    for (i, (&p, &t)) in preds.iter().zip(&targets).enumerate() {
        single.add(p, t).unwrap();
        shards[(i * 7) % 3].add(p, t).unwrap();
    }
    let mut merged = ClassificationStats::new(num_classes).unwrap();
    for s in shards.iter().rev() {
        merged.merge(&wire(s)).unwrap();
    }
    assert_eq!(merged, single);
    let m = merged.finish();
    assert_bits(m.accuracy, f(&fx["accuracy"]), "accuracy");
    assert_bits(m.macro_precision, f(&fx["macro_precision"]), "macro precision");
    assert_bits(m.macro_recall, f(&fx["macro_recall"]), "macro recall");
    assert_bits(m.macro_f1, f(&fx["macro_f1"]), "macro F1");
    for (c, pc) in m.per_class.iter().enumerate() {
        assert_bits(pc.precision, f(&fx["per_class_precision"][c]), &format!("precision[{c}]"));
        assert_bits(pc.recall, f(&fx["per_class_recall"][c]), &format!("recall[{c}]"));
        assert_bits(pc.f1, f(&fx["per_class_f1"][c]), &format!("f1[{c}]"));
        assert_eq!(pc.support, fx["support"][c].as_u64().unwrap(), "support[{c}]");
    }
}

#[test]
fn multilabel_matches_sklearn_in_any_order() {
    let fx = read_fixture("multilabel.json");
    let num_classes = fx["num_classes"].as_u64().unwrap() as usize;
    let mut samples: Vec<(u64, Vec<f64>, Vec<bool>)> = fx["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_u64().unwrap(),
                s["scores"].as_array().unwrap().iter().map(f).collect(),
                s["labels"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect(),
            )
        })
        .collect();
    let mut rng = Rng::new(5);
    let mut reference = None;
    for shards in [1usize, 2, 4, 7] {
        rng.shuffle(&mut samples);
        let mut parts: Vec<MultiLabelStats> =
            (0..shards).map(|_| MultiLabelStats::new(num_classes)).collect();
        for (id, s, l) in &samples {
            parts[rng.below(shards)].add(*id, s.clone(), l.clone()).unwrap();
        }
        let mut merged = MultiLabelStats::new(num_classes);
        for p in &parts {
            merged.merge(&wire(p)).unwrap();
        }
        let m = merged.finish();
        assert_bits(m.map, f(&fx["map"]), &format!("mAP ({shards} shards)"));
        assert_bits(m.map, f(&fx["sklearn_macro_over_valid"]), "mAP vs sklearn macro");
        for (c, ap) in m.per_class_ap.iter().enumerate() {
            match (ap, fx["per_class_ap"][c].as_f64()) {
                (Some(got), Some(want)) => assert_bits(*got, want, &format!("AP[{c}]")),
                (None, None) => {}
                (got, want) => panic!("AP[{c}]: got {got:?}, expected {want:?}"),
            }
        }
        if let Some(r) = &reference {
            assert_eq!(&merged, r);
        }
        reference = Some(merged);
    }
}

#[test]
fn segmentation_matches_numpy() {
    let fx = read_fixture("segmentation.json");
    let num_classes = fx["num_classes"].as_u64().unwrap() as usize;
    let mut single = SegmentationStats::new(num_classes).unwrap();
    let mut parts = Vec::new();
    for img in fx["images"].as_array().unwrap() {
        let bytes = |k: &str| -> Vec<u8> {
            img[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect()
        };
        let (pred, target) = (bytes("pred"), bytes("target"));
        single.add(&pred, &target).unwrap();
        let mut part = SegmentationStats::new(num_classes).unwrap();
        part.add(&pred, &target).unwrap();
        parts.push(part);
    }
    let mut merged = SegmentationStats::new(num_classes).unwrap();
    for p in parts.iter().rev() {
        merged.merge(&wire(p)).unwrap();
    }
    assert_eq!(merged, single);
    let m = merged.finish();
    assert_bits(m.miou, f(&fx["miou"]), "mIoU");
    assert_bits(m.pixel_accuracy, f(&fx["pixel_accuracy"]), "pixel accuracy");
    for (c, iou) in m.per_class_iou.iter().enumerate() {
        match (iou, fx["per_class_iou"][c].as_f64()) {
            (Some(got), Some(want)) => assert_bits(*got, want, &format!("IoU[{c}]")),
            (None, None) => {}
            (got, want) => panic!("IoU[{c}]: got {got:?}, expected {want:?}"),
        }
    }
}
