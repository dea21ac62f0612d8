use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::data::rle::rasterise;
use crate::data::testutil::text;

fn doc() -> Value {
    json!({
        "images": [
            {"id": 10, "file_name": "a.png", "width": 8, "height": 6},
            {"id": 11, "file_name": "b.png", "width": 8, "height": 6},
            {"id": 12, "file_name": "c.png", "width": 8, "height": 6}
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [0, 0, 4, 4], "area": 16,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "iscrowd": 0},
            // Column 2, rows 2..5 (column-major runs: 14 zeros, 3 ones, 31 zeros).
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [2, 2, 1, 3], "area": 9,
             "segmentation": {"counts": [14, 3, 31], "size": [6, 8]}, "iscrowd": 0},
            // Compressed "T12:" = [36, 2, 10]: column 6, rows 0..2, a crowd region.
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [6, 0, 1, 2], "area": 2,
             "segmentation": {"counts": "T12:", "size": [6, 8]}, "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4}
        ]
    })
}

fn read(value: &Value, rule: ClassRule) -> Result<Dataset, WorkerError> {
    let dir = tempfile::tempdir().unwrap();
    let path = text(dir.path(), "instances.json", &value.to_string());
    read_coco(&path, Path::new("/images"), rule)
}

#[test]
fn reads_boxes_masks_and_classes() {
    let ds = read(&doc(), ClassRule::LargestArea).unwrap();
    assert_eq!(ds.info.det_categories, vec![(3, "cat".to_string()), (7, "dog".to_string())]);
    assert_eq!(ds.info.seg_classes, vec!["background", "cat", "dog"]);
    assert!(!ds.info.multi_label);
    let [a, b, c] = &ds.samples[..] else { panic!("three images") };
    assert_eq!((a.id, a.image.clone()), (10, PathBuf::from("/images/a.png")));
    // dog (16 px) beats cat (9 px; the crowd region does not count).
    assert_eq!(a.class, Some(ClassLabel::Single(1)));
    let boxes = a.boxes.as_ref().unwrap();
    assert_eq!(
        boxes.iter().map(|b| (b.category, b.iscrowd)).collect::<Vec<_>>(),
        [(1, false), (0, false), (0, true)]
    );
    assert_eq!((boxes[0].area, boxes[2].area), (16.0, 2.0));
    let Some(MaskSource::Instances(inst)) = &a.mask else { panic!("instances") };
    let m = rasterise(inst).unwrap();
    let at = |x: usize, y: usize| m[y * 8 + x];
    assert_eq!((at(1, 1), at(3, 3), at(4, 4)), (2, 2, 0), "dog square");
    assert_eq!((at(2, 2), at(2, 4), at(2, 5)), (1, 1, 0), "cat column painted over the dog");
    assert_eq!((at(6, 0), at(6, 1), at(6, 2)), (255, 255, 0), "crowd is ignored");
    // An annotation without segmentation leaves the mask unlabelled; boxes and class stay.
    assert_eq!((b.mask.is_none(), b.class.clone()), (true, Some(ClassLabel::Single(0))));
    // No annotations: no class, 0 boxes, all-background mask.
    assert_eq!((c.class.is_none(), c.boxes.as_deref()), (true, Some(&[][..])));
    let Some(MaskSource::Instances(inst)) = &c.mask else { panic!("instances") };
    assert!(rasterise(inst).unwrap().iter().all(|&v| v == 0));
}

#[test]
fn presence_rule_is_multi_label() {
    let ds = read(&doc(), ClassRule::Presence).unwrap();
    assert!(ds.info.multi_label);
    assert_eq!(ds.samples[0].class, Some(ClassLabel::Multi(vec![0, 1])));
    assert_eq!(ds.samples[1].class, Some(ClassLabel::Multi(vec![0])));
    assert_eq!(ds.samples[2].class, None);
}

fn error_with(edit: impl FnOnce(&mut Value)) -> String {
    let mut d = doc();
    edit(&mut d);
    let err = read(&d, ClassRule::LargestArea).unwrap_err().to_string();
    assert!(err.contains("instances.json"), "names the file: {err}");
    err
}

#[test]
fn malformed_fields_are_named() {
    let e = error_with(|d| d["annotations"][1]["bbox"] = json!([1, 2, 3]));
    assert!(e.contains("annotations[1].bbox") && e.contains("4 numbers"), "{e}");
    let e = error_with(|d| d["annotations"][0]["category_id"] = json!(99));
    assert!(e.contains("annotations[0].category_id") && e.contains("unknown category id 99"), "{e}");
    let e = error_with(|d| d["images"][2]["id"] = json!("12"));
    assert!(e.contains("images[2].id") && e.contains("integer"), "{e}");
    let e = error_with(|d| d["annotations"][3]["image_id"] = json!(5));
    assert!(e.contains("annotations[3].image_id") && e.contains("image id 5 is not in images"), "{e}");
    let e = error_with(|d| d["annotations"][1]["segmentation"]["counts"] = json!([14, 3]));
    assert!(e.contains("annotations[1].segmentation.counts") && e.contains("sum to 17"), "{e}");
    let e = error_with(|d| d["annotations"][2]["segmentation"]["size"] = json!([8, 6]));
    assert!(e.contains("annotations[2].segmentation.size"), "{e}");
    let e = error_with(|d| d["annotations"][0]["segmentation"] = json!([[0, 0, 1e9, 0, 4, 4]]));
    assert!(e.contains("annotations[0].segmentation[0]") && e.contains("far outside"), "{e}");
    let e = error_with(|d| d["annotations"][0]["segmentation"] = json!([[0, 0, 1, 0, 4]]));
    assert!(e.contains("annotations[0].segmentation[0]") && e.contains("polygon"), "{e}");
    let e = error_with(|d| d["annotations"][0]["iscrowd"] = json!(2));
    assert!(e.contains("annotations[0].iscrowd") && e.contains("expected 0, 1 or a boolean"), "{e}");
    let e = error_with(|d| {
        d["annotations"][3].as_object_mut().unwrap().remove("area");
    });
    assert!(e.contains("annotations[3].area: missing"), "{e}");
    let e = error_with(|d| {
        d["images"][1].as_object_mut().unwrap().remove("width");
    });
    assert!(e.contains("images[1].width: missing"), "{e}");
    let e = error_with(|d| *d = json!({"images": []}));
    assert!(e.contains("categories: missing"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = text(dir.path(), "broken.json", "{\"images\": [");
    let e = read_coco(&path, dir.path(), ClassRule::Presence).unwrap_err().to_string();
    assert!(e.contains("broken.json") && e.contains("not JSON"), "{e}");
}

/// The worker and `worker eval --gt` read a COCO file through one reader: the same boxes, areas
/// and crowd flags (`true`/`false` as well as 1/0, as pycocotools takes them).
#[test]
fn worker_and_metrics_read_the_same_ground_truth() {
    let mut d = doc();
    d["annotations"][0]["iscrowd"] = json!(true);
    d["annotations"][1]["iscrowd"] = json!(false);
    d["annotations"][1]["bbox"] = json!([2.1, 2.2, 0.7, 3.3]);
    d["annotations"][1]["area"] = json!(1.23);
    let dir = tempfile::tempdir().unwrap();
    let path = text(dir.path(), "instances.json", &d.to_string());
    let ds = read_coco(&path, dir.path(), ClassRule::LargestArea).unwrap();
    let gt = mtl_metrics::coco::load_ground_truth(&path).unwrap();
    assert_eq!(gt.category_ids(), ds.info.det_categories.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    for sample in &ds.samples {
        let from_worker: Vec<mtl_metrics::GroundTruth> = sample
            .boxes
            .iter()
            .flatten()
            .map(|b| mtl_metrics::GroundTruth {
                bbox: [b.x, b.y, b.w, b.h],
                category_id: ds.info.det_categories[b.category as usize].0,
                area: b.area,
                iscrowd: b.iscrowd,
            })
            .collect();
        assert_eq!(from_worker, gt.images()[&sample.id].ground_truth, "image {}", sample.id);
    }
    let first = &ds.samples[0].boxes.as_ref().unwrap()[0];
    assert!(first.iscrowd, "`true` is a crowd");
}
