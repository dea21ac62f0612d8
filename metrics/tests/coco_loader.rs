//! Loading COCO files: pycocotools' `loadRes` semantics and error messages.

mod common;

use std::path::Path;

use common::fixture;
use mtl_metrics::coco::{load_detection_stats, load_ground_truth, parse_detection_stats, parse_instances};
use mtl_metrics::{Detection, DetectionStats, GroundTruth, MetricsError};
use serde_json::{json, Value};

fn gt_json() -> Value {
    json!({
        "images": [{"id": 3}, {"id": 1}, {"id": 2}],
        "categories": [{"id": 5}, {"id": 1}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 20], "area": 150.5, "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 5, "bbox": [1.5, 2, 3, 4], "area": 12, "iscrowd": 1},
            {"id": 3, "image_id": 1, "category_id": 5, "bbox": [5, 5, 5, 5], "area": 25}
        ]
    })
}

fn parse(gt: &Value, results: &Value) -> Result<DetectionStats, MetricsError> {
    parse_detection_stats(gt, Path::new("gt.json"), results, Path::new("res.json"))
}

#[test]
fn loads_like_pycocotools() {
    let results = json!([
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
        {"image_id": 3, "category_id": 5, "bbox": [1, 1, 2, 2], "score": 0.25},
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 5], "score": 0.5},
        {"image_id": 1, "category_id": 42, "bbox": [1, 1, 4, 5], "score": 0.5}
    ]);
    let stats = parse(&gt_json(), &results).unwrap();
    assert_eq!(stats.category_ids(), &[1, 5]);
    assert_eq!(stats.images().keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    let img1 = &stats.images()[&1];
    assert_eq!(
        img1.ground_truth,
        vec![
            GroundTruth { bbox: [0.0, 0.0, 10.0, 20.0], category_id: 1, area: 150.5, iscrowd: false },
            GroundTruth { bbox: [5.0, 5.0, 5.0, 5.0], category_id: 5, area: 25.0, iscrowd: false },
        ]
    );
    // File order is kept (it breaks score ties); unknown categories are kept but never evaluated.
    assert_eq!(img1.detections.len(), 3);
    assert_eq!(img1.detections[1], Detection { bbox: [1.0, 1.0, 4.0, 5.0], score: 0.5, category_id: 1 });
    assert_eq!(img1.detections[1].area(), 20.0);
    assert!(stats.images()[&3].ground_truth[0].iscrowd);
    assert!(stats.images()[&2].ground_truth.is_empty() && stats.images()[&2].detections.is_empty());
}

#[test]
fn empty_results_mean_no_detections() {
    let stats = parse(&gt_json(), &json!([])).unwrap();
    let m = stats.finish();
    // Both countable boxes are small (areas 150.5 and 25): medium and large are undefined.
    assert_eq!(m.stats(), [0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0]);
    assert_eq!(m.per_category_ap.values().copied().collect::<Vec<_>>(), vec![0.0, 0.0]);
}

#[test]
fn result_for_an_image_outside_the_ground_truth_is_an_error() {
    let results = json!([
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},
        {"image_id": 77, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}
    ]);
    let err = parse(&gt_json(), &results).unwrap_err();
    assert!(matches!(err, MetricsError::UnknownImage { image_id: 77, .. }), "{err}");
    assert_eq!(err.to_string(), "res.json: [1].image_id: image id 77 is not in the ground truth");
}

/// An edit that breaks the ground-truth JSON.
type Mutation = Box<dyn Fn(&mut Value)>;

#[test]
fn malformed_ground_truth_names_file_and_field() {
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|v| v["annotations"][2]["bbox"] = json!([1, 2, 3])),
            "gt.json: annotations[2].bbox: expected 4 numbers",
        ),
        (
            Box::new(|v| v["annotations"][0]["bbox"] = json!([1, 2, "x", 4])),
            "gt.json: annotations[0].bbox: expected 4 numbers",
        ),
        (
            Box::new(|v| {
                v["annotations"][1].as_object_mut().unwrap().remove("area");
            }),
            "gt.json: annotations[1].area: missing",
        ),
        (
            Box::new(|v| v["annotations"][1]["iscrowd"] = json!(2)),
            "gt.json: annotations[1].iscrowd: expected 0, 1 or a boolean",
        ),
        (
            Box::new(|v| v["annotations"][1]["id"] = json!(1)),
            "gt.json: annotations[1].id: duplicate annotation id 1",
        ),
        (
            Box::new(|v| v["annotations"][0]["image_id"] = json!(9)),
            "gt.json: annotations[0].image_id: image id 9 is not in images",
        ),
        (
            Box::new(|v| v["images"][1]["id"] = json!(-4)),
            "gt.json: images[1].id: expected a non-negative integer, found -4",
        ),
        (Box::new(|v| v["images"][1]["id"] = json!(3)), "gt.json: images[1].id: duplicate image id 3"),
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("categories");
            }),
            "gt.json: categories: missing",
        ),
        (Box::new(|v| v["images"] = json!({})), "gt.json: images: expected an array"),
        (
            Box::new(|v| v["categories"][1]["id"] = json!(5)),
            "gt.json: categories[1].id: duplicate category id 5",
        ),
        (
            Box::new(|v| v["annotations"][0]["bbox"] = json!([0, 0, -1, 20])),
            "gt.json: annotations[0].bbox: width and height must be >= 0, found [0.0, 0.0, -1.0, 20.0]",
        ),
        (
            Box::new(|v| v["annotations"][2]["area"] = json!(-3)),
            "gt.json: annotations[2].area: expected a number >= 0, found -3",
        ),
        (
            Box::new(|v| v["images"][0]["width"] = json!(0)),
            "gt.json: images[0].width: expected a positive integer, found 0",
        ),
    ];
    for (mutate, message) in cases {
        let mut gt = gt_json();
        mutate(&mut gt);
        let err = parse(&gt, &json!([])).unwrap_err();
        assert!(matches!(err, MetricsError::Malformed { .. }));
        assert_eq!(err.to_string(), message);
    }
}

#[test]
fn malformed_results_name_file_and_index() {
    let cases = [
        (json!({"image_id": 1}), "res.json: <root>: expected an array of results"),
        (json!([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]), "res.json: [0].score: missing"),
        (
            json!([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1}, {"image_id": 1, "category_id": 1, "bbox": [0, 1], "score": 0.1}]),
            "res.json: [1].bbox: expected 4 numbers",
        ),
        (
            json!([{"image_id": 1.5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1}]),
            "res.json: [0].image_id: expected a non-negative integer, found 1.5",
        ),
    ];
    for (results, message) in cases {
        assert_eq!(parse(&gt_json(), &results).unwrap_err().to_string(), message);
    }
}

#[test]
fn file_errors_name_the_path() {
    let missing = fixture("does_not_exist.json");
    let err = load_ground_truth(&missing).unwrap_err();
    assert!(matches!(err, MetricsError::Io { .. }));
    assert!(err.to_string().contains("does_not_exist.json"), "{err}");
    // A Python script is not JSON.
    let err = load_detection_stats(fixture("det_mixed_gt.json"), fixture("gen_fixtures.py")).unwrap_err();
    assert!(matches!(err, MetricsError::Json { .. }));
    assert!(
        err.to_string().starts_with(&format!("{}: invalid JSON", fixture("gen_fixtures.py").display())),
        "{err}"
    );
}

#[test]
fn ground_truth_only_file_has_no_detections() {
    let stats = load_ground_truth(fixture("det_mixed_gt.json")).unwrap();
    assert_eq!(stats.images().len(), 20);
    assert_eq!(stats.category_ids(), &[1, 2, 5, 7]);
    assert!(stats.images().values().all(|r| r.detections.is_empty()));
    let full = load_detection_stats(fixture("det_mixed_gt.json"), fixture("det_mixed_results.json")).unwrap();
    for (id, record) in stats.images() {
        assert_eq!(record.ground_truth, full.images()[id].ground_truth);
    }
}

/// The shared reader (the worker trains from it too): crowd flags as pycocotools reads them,
/// optional training fields, segmentations handed over as written, unknown categories kept.
#[test]
fn instances_reader_follows_pycocotools() {
    let doc = json!({
        "images": [{"id": 4, "file_name": "a.png", "width": 30, "height": 20}, {"id": 2}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 5}],
        "annotations": [
            {"id": 7, "image_id": 2, "category_id": 5, "bbox": [1, 2, 3, 4], "area": 6.5, "iscrowd": true,
             "segmentation": {"counts": [0, 1], "size": [1, 1]}},
            {"id": 8, "image_id": 4, "category_id": 9, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": false,
             "segmentation": null},
            {"id": 9, "image_id": 4, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4}
        ]
    });
    let coco = parse_instances(&doc, Path::new("gt.json")).unwrap();
    assert_eq!(
        (coco.images[0].file_name, coco.images[0].width, coco.images[0].height),
        (Some("a.png"), Some(30), Some(20))
    );
    assert_eq!((coco.images[1].file_name, coco.images[1].width), (None, None));
    assert_eq!((coco.categories[0].name, coco.categories[1].name), (Some("cat"), None));
    let crowd: Vec<bool> = coco.annotations.iter().map(|a| a.iscrowd).collect();
    assert_eq!(crowd, [true, false, false], "true/false as 1/0, missing as 0");
    assert_eq!(coco.annotations[0].image, 1, "position of image id 2");
    assert_eq!(coco.annotations[0].segmentation, Some(&doc["annotations"][0]["segmentation"]));
    assert_eq!(coco.annotations[1].segmentation, None, "null is no segmentation");
    assert_eq!(coco.annotations[1].category_id, 9, "an unlisted category is kept");
    assert_eq!(
        coco.annotations[0].ground_truth(),
        GroundTruth { bbox: [1.0, 2.0, 3.0, 4.0], category_id: 5, area: 6.5, iscrowd: true }
    );
}
