//! Hand-computed edge cases for classification, multi-label and segmentation
//! statistics, merge errors, and wire-format validation.

mod common;

use common::{wire, Rng};
use mtl_metrics::numeric::mean;
use mtl_metrics::{
    multilabel::average_precision, ClassificationStats, MetricsError, MultiLabelStats, SegmentationStats,
};

#[test]
fn classification_includes_every_class_in_the_macro_average() {
    // 3 classes; class 2 never occurs in targets nor predictions.
    let mut s = ClassificationStats::new(3).unwrap();
    for (p, t) in [(0, 0), (0, 0), (1, 0), (1, 1), (0, 1)] {
        s.add(p, t).unwrap();
    }
    let m = s.finish();
    assert_eq!(m.accuracy, 3.0 / 5.0);
    // class 0: tp 2, predicted 3, support 3; class 1: tp 1, predicted 2, support 2.
    let (p0, r0, f0) = (2.0 / 3.0, 2.0 / 3.0, 4.0 / 6.0);
    let (p1, r1, f1) = (1.0 / 2.0, 1.0 / 2.0, 2.0 / 4.0);
    assert_eq!(m.per_class[2].precision, 0.0);
    assert_eq!(m.per_class[2].support, 0);
    assert_eq!(m.macro_precision, mean(&[p0, p1, 0.0]));
    assert_eq!(m.macro_recall, mean(&[r0, r1, 0.0]));
    assert_eq!(m.macro_f1, mean(&[f0, f1, 0.0]));
    assert_eq!(m.confusion, vec![vec![2, 1, 0], vec![1, 1, 0], vec![0, 0, 0]]);
}

#[test]
fn classification_errors() {
    let mut s = ClassificationStats::new(2).unwrap();
    let err = s.add(2, 0).unwrap_err();
    assert_eq!(err.to_string(), "classification prediction: class 2 out of range (num_classes = 2)");
    assert!(s.add(0, 5).unwrap_err().to_string().starts_with("classification target"));
    assert!(ClassificationStats::new(0).is_err());
    let err = s.merge(&ClassificationStats::new(3).unwrap()).unwrap_err();
    assert_eq!(err.to_string(), "classification merge: num_classes mismatch (2 vs 3)");
    assert!(s.finish().accuracy.is_nan(), "no samples: accuracy undefined");
    // A malformed wire message is rejected instead of panicking later.
    let bad = r#"{"num_classes":2,"confusion":[1,2,3]}"#;
    let err = serde_json::from_str::<ClassificationStats>(bad).unwrap_err();
    assert!(err.to_string().contains("classification confusion"), "{err}");
}

#[test]
fn classification_merge_equals_single_pass_in_any_split() {
    let mut rng = Rng::new(3);
    let samples: Vec<(usize, usize)> = (0..500).map(|_| (rng.below(4), rng.below(4))).collect();
    let mut single = ClassificationStats::new(4).unwrap();
    for &(p, t) in &samples {
        single.add(p, t).unwrap();
    }
    for shards in [2, 3, 8] {
        let mut parts: Vec<_> = (0..shards).map(|_| ClassificationStats::new(4).unwrap()).collect();
        for &(p, t) in &samples {
            parts[rng.below(shards)].add(p, t).unwrap();
        }
        rng.shuffle(&mut parts);
        let mut merged = ClassificationStats::new(4).unwrap();
        for part in &parts {
            merged.merge(&wire(part)).unwrap();
        }
        assert_eq!(merged, single);
        assert_eq!(merged.finish(), single.finish());
    }
}

#[test]
fn average_precision_matches_sklearn_examples() {
    // sklearn docs: average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]).
    let ap = average_precision(&[(0.1, false), (0.4, false), (0.35, true), (0.8, true)]).unwrap();
    assert_eq!(ap, 0.5 * 1.0 + 0.5 * (2.0 / 3.0));
    // All scores tied: a single threshold, AP = prevalence.
    let ap = average_precision(&[(0.5, true), (0.5, false), (0.5, false), (0.5, true)]).unwrap();
    assert_eq!(ap, 0.5);
    // Order of tied samples does not matter.
    let a = average_precision(&[(0.7, true), (0.7, false), (0.2, true)]);
    let b = average_precision(&[(0.7, false), (0.2, true), (0.7, true)]);
    assert_eq!(a, b);
    assert_eq!(average_precision(&[(0.3, false), (0.9, false)]), None);
}

#[test]
fn multilabel_skips_classes_without_positives() {
    let mut s = MultiLabelStats::new(3);
    s.add(10, vec![0.9, 0.1, 0.3], vec![true, false, false]).unwrap();
    s.add(4, vec![0.2, 0.8, 0.6], vec![false, false, true]).unwrap();
    let m = s.finish();
    assert_eq!(m.per_class_ap, vec![Some(1.0), None, Some(1.0)]);
    assert_eq!(m.map, 1.0);
    assert!(MultiLabelStats::new(2).finish().map.is_nan());
}

#[test]
fn multilabel_errors_and_union_merge() {
    let mut a = MultiLabelStats::new(2);
    a.add(1, vec![0.1, 0.2], vec![true, false]).unwrap();
    assert!(matches!(
        a.add(1, vec![0.1, 0.2], vec![true, false]),
        Err(MetricsError::DuplicateId { id: 1, .. })
    ));
    let err = a.add(2, vec![0.1], vec![true, false]).unwrap_err();
    assert_eq!(err.to_string(), "multi-label sample 2 scores vs num_classes: length mismatch (1 vs 2)");
    assert!(matches!(a.add(3, vec![f64::NAN, 0.0], vec![true, false]), Err(MetricsError::NonFinite { .. })));
    let mut b = MultiLabelStats::new(2);
    b.add(2, vec![0.3, 0.9], vec![false, true]).unwrap();
    b.add(1, vec![0.3, 0.9], vec![false, true]).unwrap();
    let before = a.clone();
    assert!(matches!(a.merge(&b), Err(MetricsError::DuplicateId { id: 1, .. })));
    assert_eq!(a, before);
    assert!(a.merge(&MultiLabelStats::new(3)).is_err());
    let mut c = MultiLabelStats::new(2);
    c.add(2, vec![0.3, 0.9], vec![false, true]).unwrap();
    let mut ab = a.clone();
    ab.merge(&c).unwrap();
    let mut ba = c.clone();
    ba.merge(&a).unwrap();
    assert_eq!(ab, ba);
    assert_eq!(ab.samples().keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    let bad = r#"{"num_classes":2,"samples":{"5":{"scores":[0.1],"labels":[true,false]}}}"#;
    assert!(serde_json::from_str::<MultiLabelStats>(bad).is_err());
}

#[test]
fn segmentation_ignores_255_and_skips_absent_classes() {
    let mut s = SegmentationStats::new(4).unwrap();
    // Class 3 is absent from prediction and target; pixels with target 255 are
    // ignored whatever their prediction.
    s.add(&[0, 0, 1, 1, 2, 0, 3], &[0, 1, 1, 1, 255, 255, 255]).unwrap();
    s.add(&[2, 0], &[2, 0]).unwrap();
    let m = s.finish();
    // class 0: inter 2, union 3 (pred 0 on a class-1 pixel); class 1: 2/3; class 2: 1/1.
    assert_eq!(m.per_class_iou, vec![Some(2.0 / 3.0), Some(2.0 / 3.0), Some(1.0), None]);
    assert_eq!(m.miou, (2.0 / 3.0 + 2.0 / 3.0 + 1.0 + 0.0) / 3.0);
    assert_eq!(m.pixel_accuracy, 5.0 / 6.0);
    assert_eq!(s.count(1, 0), 1);
    assert_eq!((0..4).map(|p| s.count(2, p)).sum::<u64>(), 1, "ignored pixel not counted");
}

#[test]
fn segmentation_errors_leave_stats_unchanged() {
    let mut s = SegmentationStats::new(3).unwrap();
    s.add(&[0, 1], &[0, 1]).unwrap();
    let before = s.clone();
    let err = s.add(&[0, 1, 3], &[0, 1, 2]).unwrap_err();
    assert_eq!(err.to_string(), "segmentation prediction at pixel 2: class 3 out of range (num_classes = 3)");
    let err = s.add(&[0, 1, 2], &[0, 7, 2]).unwrap_err();
    assert_eq!(err.to_string(), "segmentation target at pixel 1: class 7 out of range (num_classes = 3)");
    // A prediction of 255 is not "ignore": only the target can ignore a pixel.
    assert!(s.add(&[255], &[0]).is_err());
    assert!(matches!(s.add(&[0, 1], &[0]), Err(MetricsError::LengthMismatch { .. })));
    assert_eq!(s, before);
    assert!(s.merge(&SegmentationStats::new(4).unwrap()).is_err());
    assert!(SegmentationStats::new(0).is_err() && SegmentationStats::new(256).is_err());
    let empty = SegmentationStats::new(2).unwrap().finish();
    assert!(empty.miou.is_nan() && empty.pixel_accuracy.is_nan());
    assert_eq!(empty.per_class_iou, vec![None, None]);
    assert!(serde_json::from_str::<SegmentationStats>(r#"{"num_classes":2,"confusion":[0]}"#).is_err());
}

#[test]
fn segmentation_merge_equals_single_pass() {
    let mut rng = Rng::new(9);
    let images: Vec<(Vec<u8>, Vec<u8>)> = (0..12)
        .map(|_| {
            let target: Vec<u8> =
                (0..64).map(|_| if rng.below(10) == 0 { 255 } else { rng.below(5) as u8 }).collect();
            let pred: Vec<u8> = (0..64).map(|_| rng.below(5) as u8).collect();
            (pred, target)
        })
        .collect();
    let mut single = SegmentationStats::new(6).unwrap();
    for (p, t) in &images {
        single.add(p, t).unwrap();
    }
    let mut parts: Vec<_> = (0..4).map(|_| SegmentationStats::new(6).unwrap()).collect();
    for (i, (p, t)) in images.iter().enumerate() {
        parts[(i * 5) % 4].add(p, t).unwrap();
    }
    let mut merged = SegmentationStats::new(6).unwrap();
    for part in parts.iter().rev() {
        merged.merge(&wire(part)).unwrap();
    }
    assert_eq!(merged, single);
    let (a, b) = (merged.finish(), single.finish());
    assert_eq!(a.miou.to_bits(), b.miou.to_bits());
    assert_eq!(a.per_class_iou[5], None);
}

#[test]
fn confusion_statistics_keep_their_wire_format() {
    // Workers and coordinators of one release exchange these as JSON: the format is
    // `{"num_classes": n, "confusion": [row-major counts, target by prediction]}` for both.
    let mut c = ClassificationStats::new(2).unwrap();
    c.add(1, 0).unwrap();
    assert_eq!(serde_json::to_string(&c).unwrap(), r#"{"num_classes":2,"confusion":[0,1,0,0]}"#);
    let mut s = SegmentationStats::new(2).unwrap();
    s.add(&[0, 0, 1], &[1, 255, 1]).unwrap();
    assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"num_classes":2,"confusion":[0,0,1,1]}"#);
    assert_eq!(wire(&c), c);
    assert_eq!(wire(&s), s);
    let err = serde_json::from_str::<SegmentationStats>(r#"{"num_classes":0,"confusion":[]}"#).unwrap_err();
    assert!(err.to_string().contains("segmentation: invalid num_classes 0"), "{err}");
}
