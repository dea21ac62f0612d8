//! The `EvalStats` bundle: merge, wire format and the flat report map.

mod common;

use common::{fixture, split_detection, wire};
use mtl_metrics::coco::load_detection_stats;
use mtl_metrics::{ClassificationStats, EvalStats, MultiLabelStats, SegmentationStats};

fn worker(shard: u64, detection: mtl_metrics::DetectionStats) -> EvalStats {
    let mut classification = ClassificationStats::new(3).unwrap();
    let mut multilabel = MultiLabelStats::new(2);
    let mut segmentation = SegmentationStats::new(3).unwrap();
    for i in 0..10u64 {
        let id = shard * 100 + i;
        classification.add((id % 3) as usize, ((id / 3) % 3) as usize).unwrap();
        let score = (id % 7) as f64 / 7.0;
        multilabel.add(id, vec![score, 1.0 - score], vec![id % 2 == 0, id % 5 == 0]).unwrap();
        segmentation.add(&[(id % 3) as u8, 1], &[((id / 2) % 3) as u8, 255]).unwrap();
    }
    EvalStats {
        classification: Some(classification),
        multilabel: Some(multilabel),
        detection: Some(detection),
        segmentation: Some(segmentation),
    }
}

#[test]
fn bundle_merge_is_order_independent_and_survives_the_wire() {
    let det = load_detection_stats(fixture("det_mixed_gt.json"), fixture("det_mixed_results.json")).unwrap();
    let shards: Vec<EvalStats> =
        split_detection(&det, 3, |n| n).into_iter().enumerate().map(|(i, d)| worker(i as u64, d)).collect();
    let mut forward = EvalStats::default();
    for s in &shards {
        forward.merge(&wire(s)).unwrap();
    }
    let mut backward = EvalStats::default();
    for s in shards.iter().rev() {
        backward.merge(&wire(s)).unwrap();
    }
    assert_eq!(forward, backward);
    let (a, b) = (wire(&forward).finish(), backward.finish());
    let (ma, mb) = (a.to_map(), b.to_map());
    let keys: Vec<&str> = ma.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        vec![
            "AP",
            "AP50",
            "AP75",
            "APl",
            "APm",
            "APs",
            "AR1",
            "AR10",
            "AR100",
            "ARl",
            "ARm",
            "ARs",
            "F1",
            "accuracy",
            "mAP",
            "mIoU",
            "pixel_accuracy",
            "precision",
            "recall",
        ]
    );
    for (k, v) in &ma {
        assert_eq!(v.to_bits(), mb[k].to_bits(), "{k}");
    }
    // Every key belongs to its task (TensorBoard tags group by it).
    let tasks: Vec<_> = keys.iter().map(|k| mtl_metrics::task_of(k)).collect();
    assert!(tasks.iter().all(Option::is_some), "{keys:?}: {tasks:?}");
    assert_eq!(mtl_metrics::task_of("mAP"), Some("classification"));
    assert_eq!(mtl_metrics::task_of("AR100"), Some("detection"));
    assert_eq!(mtl_metrics::task_of("mIoU"), Some("segmentation"));
    assert_eq!(mtl_metrics::task_of("loss/cls"), None);
    // The detection part equals a single-process evaluation of the whole file.
    assert_eq!(a.detection.unwrap(), det.finish());
    assert_eq!(ma["AP"], det.finish().ap);
}

#[test]
fn bundle_parts_missing_on_one_side_are_taken_as_is() {
    let mut coordinator = EvalStats::default();
    let only_seg = EvalStats { segmentation: Some(SegmentationStats::new(3).unwrap()), ..Default::default() };
    coordinator.merge(&only_seg).unwrap();
    assert_eq!(coordinator, only_seg);
    let report = coordinator.finish();
    assert_eq!(
        report.to_map().keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["mIoU", "pixel_accuracy"]
    );
    assert!(EvalStats::default().finish().to_map().is_empty());
}

#[test]
fn failed_bundle_merge_changes_nothing() {
    let mut a = EvalStats {
        classification: Some(ClassificationStats::new(3).unwrap()),
        segmentation: Some(SegmentationStats::new(3).unwrap()),
        ..Default::default()
    };
    let b = EvalStats {
        classification: Some(ClassificationStats::new(3).unwrap()),
        segmentation: Some(SegmentationStats::new(4).unwrap()),
        multilabel: Some(MultiLabelStats::new(2)),
        ..Default::default()
    };
    let before = a.clone();
    let err = a.merge(&b).unwrap_err();
    assert_eq!(err.to_string(), "segmentation merge: num_classes mismatch (3 vs 4)");
    assert_eq!(a, before);
}
