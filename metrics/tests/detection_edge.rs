//! Hand-computed COCO edge cases. Each expectation is derived from pycocotools'
//! algorithm by hand (and was cross-checked against pycocotools once while
//! writing these tests). A perfect detector scores `1 / (1 + eps)`, not 1:
//! pycocotools divides `tp / (tp + fp + np.spacing(1))`. Means over recall/IoU
//! thresholds are numpy means (pairwise summation), written out explicitly.

use mtl_metrics::numeric::mean;
use mtl_metrics::{Detection, DetectionMetrics, DetectionStats, GroundTruth, MetricsError};

const PERFECT: f64 = 1.0 / (1.0 + f64::EPSILON);

fn gt(bbox: [f64; 4], category_id: u64) -> GroundTruth {
    GroundTruth { bbox, category_id, area: bbox[2] * bbox[3], iscrowd: false }
}

fn crowd(bbox: [f64; 4], category_id: u64) -> GroundTruth {
    GroundTruth { iscrowd: true, ..gt(bbox, category_id) }
}

fn det(bbox: [f64; 4], score: f64, category_id: u64) -> Detection {
    Detection { bbox, score, category_id }
}

fn eval(categories: &[u64], images: Vec<(u64, Vec<GroundTruth>, Vec<Detection>)>) -> DetectionMetrics {
    let mut stats = DetectionStats::new(categories.iter().copied());
    for (id, g, d) in images {
        stats.add_image(id, g, d).unwrap();
    }
    stats.finish()
}

/// A 40x40 (medium) box and a few helpers around it.
const MED: [f64; 4] = [10.0, 10.0, 40.0, 40.0];
const FAR: [f64; 4] = [200.0, 200.0, 40.0, 40.0];

#[test]
fn no_detections_at_all_gives_zero_ap_and_ar() {
    let m = eval(&[1], vec![(1, vec![gt(MED, 1)], vec![])]);
    assert_eq!(m.stats(), [0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0]);
    assert_eq!(m.per_category_ap[&1], 0.0);
}

#[test]
fn no_ground_truth_at_all_is_undefined_everywhere() {
    let m = eval(&[1], vec![(1, vec![], vec![det(MED, 0.9, 1)])]);
    assert_eq!(m.stats(), [-1.0; 12]);
    let empty = DetectionStats::new([1, 2]).finish();
    assert_eq!(empty.stats(), [-1.0; 12]);
}

#[test]
fn category_without_ground_truth_is_left_out_of_the_mean() {
    // Category 2 has only (false positive) detections: -1, excluded; category 1 is perfect.
    let m = eval(&[1, 2], vec![(1, vec![gt(MED, 1)], vec![det(MED, 0.5, 1), det(FAR, 0.9, 2)])]);
    assert_eq!(m.per_category_ap[&2], -1.0);
    assert_eq!(m.per_category_ap[&1], PERFECT);
    assert_eq!(m.ap, PERFECT);
    assert_eq!(m.ar100, 1.0);
}

#[test]
fn all_crowd_ground_truth_is_undefined_and_detections_on_it_are_ignored() {
    let m = eval(&[1], vec![(1, vec![crowd(MED, 1)], vec![det(MED, 0.9, 1)])]);
    assert_eq!(m.stats(), [-1.0; 12]);
}

#[test]
fn detections_inside_a_crowd_region_are_not_false_positives() {
    let big_crowd = crowd([0.0, 0.0, 200.0, 200.0], 1);
    // Two high-scoring detections inside the crowd region (IoU with a crowd box is
    // intersection / detection area = 1), then the true positive.
    let dets = vec![
        det([5.0, 5.0, 20.0, 20.0], 0.9, 1),
        det([60.0, 60.0, 20.0, 20.0], 0.8, 1),
        det([300.0, 300.0, 40.0, 40.0], 0.7, 1),
    ];
    let m = eval(&[1], vec![(1, vec![big_crowd, gt([300.0, 300.0, 40.0, 40.0], 1)], dets)]);
    assert_eq!(m.ap, PERFECT);
    assert_eq!(m.ar100, 1.0);
    // maxDets=1 keeps only the top detection, which is ignored: nothing recalled.
    assert_eq!(m.ar1, 0.0);
}

#[test]
fn max_dets_is_per_image_and_category() {
    // Per category, the first-ranked detection is a hit, so AR1 is 1 for both
    // even though each image holds two categories' detections.
    let m = eval(
        &[1, 2],
        vec![(
            1,
            vec![gt(MED, 1), gt(FAR, 2)],
            vec![det(MED, 0.9, 1), det(FAR, 0.3, 2), det([100.0, 10.0, 40.0, 40.0], 0.2, 2)],
        )],
    );
    assert_eq!(m.ar1, 1.0);
    // Within one category, a higher-scored false positive pushes the hit out of
    // the top-1 but not out of the top-10.
    let m = eval(&[1], vec![(1, vec![gt(MED, 1)], vec![det(FAR, 0.9, 1), det(MED, 0.5, 1)])]);
    assert_eq!((m.ar1, m.ar10, m.ar100), (0.0, 1.0, 1.0));
    // Precision at recall 1 is 1 / (2 + eps) = 0.5 (2 + eps rounds to 2).
    assert_eq!(m.ap, 0.5);
}

#[test]
fn more_than_100_detections_per_image_and_category_are_cut() {
    let fps = |n: usize| -> Vec<Detection> {
        (0..n).map(|i| det([500.0 + i as f64, 500.0, 10.0, 10.0], 0.9, 1)).collect()
    };
    let mut dets = fps(100);
    dets.push(det(MED, 0.1, 1)); // rank 101: dropped
    let m = eval(&[1], vec![(1, vec![gt(MED, 1)], dets)]);
    assert_eq!((m.ap, m.ar100), (0.0, 0.0));
    let mut dets = fps(99);
    dets.push(det(MED, 0.1, 1)); // rank 100: kept
    let m = eval(&[1], vec![(1, vec![gt(MED, 1)], dets.clone())]);
    assert_eq!(m.ar100, 1.0);
    // Precision at the hit is 1 / (99 + 1 + eps) = 0.01 at every recall and IoU threshold.
    assert_eq!(m.ap, mean(&[0.01; 1010]));
    // Another category's detections in the same image do not count towards the cap.
    dets.extend(fps(50).into_iter().map(|d| Detection { category_id: 2, ..d }));
    let m = eval(&[1, 2], vec![(1, vec![gt(MED, 1)], dets)]);
    assert_eq!(m.ar100, 1.0);
}

#[test]
fn area_ranges_use_the_ground_truth_area_field() {
    let small = gt([0.0, 0.0, 10.0, 10.0], 1); // area 100
    let large = gt([100.0, 100.0, 120.0, 120.0], 1); // area 14400
    let m = eval(
        &[1],
        vec![(1, vec![small.clone(), large.clone()], vec![det(small.bbox, 0.9, 1), det(large.bbox, 0.8, 1)])],
    );
    assert_eq!((m.ap_small, m.ap_medium, m.ap_large), (PERFECT, -1.0, PERFECT));
    assert_eq!((m.ar_small, m.ar_medium, m.ar_large), (1.0, -1.0, 1.0));

    // A 50x50 box (2500, medium) whose annotation area is 900 (small): small.
    let masked = GroundTruth { area: 900.0, ..gt([0.0, 0.0, 50.0, 50.0], 1) };
    let m = eval(&[1], vec![(1, vec![masked.clone()], vec![det(masked.bbox, 0.9, 1)])]);
    assert_eq!((m.ap_small, m.ap_medium), (PERFECT, -1.0));

    // An unmatched detection outside the area range is ignored for that range only.
    let m = eval(
        &[1],
        vec![(
            1,
            vec![small.clone()],
            vec![det([300.0, 300.0, 150.0, 150.0], 0.95, 1), det(small.bbox, 0.9, 1)],
        )],
    );
    assert_eq!(m.ap_small, PERFECT);
    assert_eq!(m.ap, 0.5);
}

#[test]
fn score_ties_keep_insertion_order_within_an_image() {
    let hit = det(MED, 0.5, 1);
    let miss = det(FAR, 0.5, 1);
    let first_hit = eval(&[1], vec![(1, vec![gt(MED, 1)], vec![hit.clone(), miss.clone()])]);
    let first_miss = eval(&[1], vec![(1, vec![gt(MED, 1)], vec![miss, hit])]);
    assert_eq!(first_hit.ap, PERFECT);
    assert_eq!(first_miss.ap, 0.5);
}

#[test]
fn score_ties_across_images_follow_image_id_order_not_insertion_order() {
    // The tied hit is in image 1, the tied miss in image 2: image 1 ranks first
    // however the images were added or merged.
    let a = (1, vec![gt(MED, 1)], vec![det(MED, 0.5, 1)]);
    let b = (2, vec![], vec![det(MED, 0.5, 1)]);
    let forward = eval(&[1], vec![a.clone(), b.clone()]);
    let backward = eval(&[1], vec![b, a]);
    assert_eq!(forward, backward);
    assert_eq!(forward.ap, PERFECT);
}

#[test]
fn iou_threshold_boundaries() {
    // IoU exactly 0.5 matches at 0.5 (>= comparison) and fails at 0.55.
    let g = gt([0.0, 0.0, 20.0, 10.0], 1);
    let d = det([0.0, 0.0, 10.0, 10.0], 0.9, 1); // IoU = 100 / 200
    let m = eval(&[1], vec![(1, vec![g], vec![d])]);
    // 101 recall thresholds at precision 1/(1+eps) for t = 0.5, zeros for the 9 others.
    let at_05 = [PERFECT; 101];
    assert_eq!(m.ap50, mean(&at_05));
    assert_eq!(m.ap75, 0.0);
    let mut all = vec![0.0; 1010];
    all[..101].copy_from_slice(&at_05);
    assert_eq!(m.ap, mean(&all));
    assert_eq!(m.ar100, mean(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
}

#[test]
fn merge_and_add_errors_name_the_problem() {
    let mut a = DetectionStats::new([1, 2]);
    a.add_image(7, vec![], vec![]).unwrap();
    let err = a.add_image(7, vec![], vec![]).unwrap_err();
    assert!(matches!(err, MetricsError::DuplicateId { id: 7, .. }), "{err}");
    assert_eq!(err.to_string(), "detection image: duplicate id 7");

    let mut b = DetectionStats::new([2, 1, 1]);
    b.add_image(7, vec![gt(MED, 1)], vec![]).unwrap();
    let before = a.clone();
    assert!(matches!(a.merge(&b), Err(MetricsError::DuplicateId { id: 7, .. })));
    assert_eq!(a, before, "a failed merge leaves the statistics unchanged");

    let c = DetectionStats::new([1, 3]);
    let err = a.merge(&c).unwrap_err();
    assert!(matches!(err, MetricsError::CategoryMismatch { .. }), "{err}");

    let err = a.add_image(8, vec![], vec![det(MED, f64::NAN, 1)]).unwrap_err();
    assert!(err.to_string().contains("image 8 detection 0"), "{err}");
}
