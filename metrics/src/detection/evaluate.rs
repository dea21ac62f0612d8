//! Per image and category evaluation: pycocotools' `computeIoU` + `evaluateImg`.

use std::cmp::Ordering;

use super::{DetectionStats, GroundTruth, ImageRecord};
use crate::numeric;

/// Largest number of detections per image and category that is evaluated.
pub(super) const MAX_DETS: [usize; 3] = [1, 10, 100];
/// Area ranges all, small, medium, large (inclusive bounds, as pycocotools).
pub(super) const AREA_RANGES: [(f64, f64); 4] =
    [(0.0, 1e10), (0.0, 32.0 * 32.0), (32.0 * 32.0, 96.0 * 96.0), (96.0 * 96.0, 1e10)];

/// `np.linspace(.5, 0.95, 10)`, bit-identical to pycocotools' `iouThrs`.
pub(super) fn iou_thresholds() -> Vec<f64> {
    numeric::linspace(0.5, 0.95, 10)
}

/// `np.linspace(.0, 1.00, 101)`, pycocotools' `recThrs`.
pub(super) fn recall_thresholds() -> Vec<f64> {
    numeric::linspace(0.0, 1.0, 101)
}

/// The result of `evaluateImg` for one image, category and area range.
#[derive(Debug)]
pub(super) struct EvalImg {
    /// Scores of the kept detections, sorted descending (stable).
    pub(super) scores: Vec<f64>,
    /// `matched[t * D + d]`: detection `d` matched some ground truth at threshold `t`.
    pub(super) matched: Vec<bool>,
    /// `ignored[t * D + d]`: detection `d` is ignored at threshold `t`.
    pub(super) ignored: Vec<bool>,
    /// Number of ground truths that are not ignored (`npig` contribution).
    pub(super) num_gt: usize,
}

/// All per-image results, indexed `[(k * A + a) * I + i]` for category index `k`,
/// area range `a` and image index `i` (images in id order).
pub(super) struct PerImage {
    pub(super) num_images: usize,
    pub(super) evals: Vec<Option<EvalImg>>,
}

impl PerImage {
    pub(super) fn get(&self, k: usize, a: usize, i: usize) -> Option<&EvalImg> {
        self.evals[(k * AREA_RANGES.len() + a) * self.num_images + i].as_ref()
    }
}

/// Evaluates every (category, area range, image) triple.
pub(super) fn evaluate_all(stats: &DetectionStats) -> PerImage {
    let num_images = stats.images.len();
    let a_count = AREA_RANGES.len();
    let mut evals: Vec<Option<EvalImg>> = Vec::with_capacity(stats.category_ids.len() * a_count * num_images);
    evals.resize_with(stats.category_ids.len() * a_count * num_images, || None);
    let thresholds = iou_thresholds();
    for (k, &cat) in stats.category_ids.iter().enumerate() {
        for (i, record) in stats.images.values().enumerate() {
            for (a, result) in evaluate_image(record, cat, &thresholds).into_iter().enumerate() {
                evals[(k * a_count + a) * num_images + i] = result;
            }
        }
    }
    PerImage { num_images, evals }
}

/// Descending-score order that keeps ties in input order (numpy's
/// `argsort(-scores, kind='mergesort')`).
pub(super) fn descending(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

/// pycocotools' `maskUtils.iou` for boxes (`bbIou` in maskApi.c), same operation order.
fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let da = d[2] * d[3];
    let ga = g[2] * g[3];
    let i = w * h;
    let u = if crowd { da } else { da + ga - i };
    i / u
}

/// `evaluateImg` of one image and category for each of the four area ranges.
fn evaluate_image(record: &ImageRecord, cat: u64, thresholds: &[f64]) -> Vec<Option<EvalImg>> {
    let gts: Vec<&GroundTruth> = record.ground_truth.iter().filter(|g| g.category_id == cat).collect();
    let mut dts: Vec<_> = record.detections.iter().filter(|d| d.category_id == cat).collect();
    if gts.is_empty() && dts.is_empty() {
        return AREA_RANGES.iter().map(|_| None).collect();
    }
    dts.sort_by(|a, b| descending(a.score, b.score));
    dts.truncate(MAX_DETS[MAX_DETS.len() - 1]);
    let num_dt = dts.len();
    // ious[d][g], ground truth in input order.
    let ious: Vec<Vec<f64>> =
        dts.iter().map(|d| gts.iter().map(|g| box_iou(&d.bbox, &g.bbox, g.iscrowd)).collect()).collect();
    let num_t = thresholds.len();
    AREA_RANGES
        .iter()
        .map(|&(lo, hi)| {
            let outside = |area: f64| area < lo || area > hi;
            // Ground truth sorted so that ignored ones come last (stable).
            let mut order: Vec<usize> = (0..gts.len()).collect();
            order.sort_by_key(|&g| gts[g].iscrowd || outside(gts[g].area));
            let gt_ignore: Vec<bool> =
                order.iter().map(|&g| gts[g].iscrowd || outside(gts[g].area)).collect();
            let crowd: Vec<bool> = order.iter().map(|&g| gts[g].iscrowd).collect();
            let mut matched = vec![false; num_t * num_dt];
            let mut ignored = vec![false; num_t * num_dt];
            if !gts.is_empty() && num_dt > 0 {
                for (t, &thr) in thresholds.iter().enumerate() {
                    let mut gt_taken = vec![false; gts.len()];
                    for d in 0..num_dt {
                        let mut best = thr.min(1.0 - 1e-10);
                        let mut m: Option<usize> = None;
                        for (gi, &g) in order.iter().enumerate() {
                            if gt_taken[gi] && !crowd[gi] {
                                continue;
                            }
                            if let Some(mi) = m {
                                if !gt_ignore[mi] && gt_ignore[gi] {
                                    break;
                                }
                            }
                            let iou = ious[d][g];
                            if iou < best {
                                continue;
                            }
                            best = iou;
                            m = Some(gi);
                        }
                        if let Some(mi) = m {
                            ignored[t * num_dt + d] = gt_ignore[mi];
                            matched[t * num_dt + d] = true;
                            gt_taken[mi] = true;
                        }
                    }
                }
            }
            for (d, det) in dts.iter().enumerate() {
                if outside(det.area()) {
                    for t in 0..num_t {
                        if !matched[t * num_dt + d] {
                            ignored[t * num_dt + d] = true;
                        }
                    }
                }
            }
            Some(EvalImg {
                scores: dts.iter().map(|d| d.score).collect(),
                matched,
                ignored,
                num_gt: gt_ignore.iter().filter(|&&ig| !ig).count(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_matches_hand_computation() {
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [5.0, 0.0, 10.0, 10.0];
        assert_eq!(box_iou(&a, &b, false), 50.0 / 150.0);
        // Crowd: intersection over detection area.
        assert_eq!(box_iou(&a, &b, true), 0.5);
        assert_eq!(box_iou(&a, &[10.0, 0.0, 5.0, 5.0], false), 0.0);
    }

    #[test]
    fn thresholds_have_pycocotools_shape() {
        let t = iou_thresholds();
        assert_eq!(t.len(), 10);
        assert!(t.contains(&0.5) && t.contains(&0.75));
        let r = recall_thresholds();
        assert_eq!((r.len(), r[0], r[100]), (101, 0.0, 1.0));
    }
}
